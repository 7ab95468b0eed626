"""The Judge stage: judges (judges.py: self, reward model, verifier; pairrm.py), what they take and give
(judge_types.py), verifiers (verifiers.py), pairing (judges.pair_round) and, for algorithm rest, the selection of
supervised examples (self_training.py). May generate (a self-judge, a refiner), never trains."""
