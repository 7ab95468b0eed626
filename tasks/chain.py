"""How rounds link: the model after round r is Train(r)'s checkpoint, and after round 0 the base model."""


def model_task(task, round_idx: int):
    """The task whose output is the model after `round_idx` rounds, with `task`'s run parameters."""
    from tasks.base_model import BaseModel
    from tasks.train import Train

    return task.clone(BaseModel) if round_idx == 0 else task.clone(Train, round_idx=round_idx)
