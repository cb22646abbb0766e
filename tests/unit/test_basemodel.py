"""make_base: loadable checkpoints for every architecture, the cache, errors, and the CLI commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from swarm import basemodel
from swarm.basemodel import META_FILE, BaseSpec, make_base
from swarm.cli_base import register
from swarm.corpus import generate

pytestmark = pytest.mark.timeout(120)

TINY = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "pretrain_steps": 0}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_make_base_loads_with_auto_classes(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    out = make_base(tmp_path / "base", arch=arch, cache_dir=tmp_path / "cache", progress=False, **TINY)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch
    assert model.config.num_hidden_layers == 2 and not model.config.tie_word_embeddings
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert len(tok) == model.config.vocab_size == 512
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("</s>", "<pad>", "<s>")
    # Whatever class AutoTokenizer picks (qwen2 -> Qwen2Tokenizer), ids match the trained tokenizer.
    raw = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    texts = generate("finetune", 3) + generate("pretrain", 3) + ["Mixed CASE, digits 1234 and ünïcode!\n"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == raw(text)["input_ids"]
        assert tok.decode(ids) == text
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()


def test_cache_hit_is_fast_and_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = make_base(tmp_path / "a", cache_dir=cache, progress=False, **TINY)

    def no_rebuild(*args: object) -> None:
        raise AssertionError("a cache hit must not rebuild")

    monkeypatch.setattr(basemodel, "_build", no_rebuild)
    t0 = time.perf_counter()
    second = make_base(tmp_path / "b", cache_dir=cache, progress=False, **TINY)
    assert time.perf_counter() - t0 < 2.0
    assert _files(first) == _files(second)
    monkeypatch.undo()
    entries = list(cache.iterdir())
    assert [e.name for e in entries] == [BaseSpec(**TINY, intermediate=128).key()]  # no temp dir left behind
    make_base(tmp_path / "c", cache_dir=cache, progress=False, **{**TINY, "seed": 1})
    assert len(list(cache.iterdir())) == 2  # another seed is another entry


def test_env_var_cache_and_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASWARM_CACHE", str(tmp_path / "env"))
    make_base(tmp_path / "a", progress=False, **TINY)
    assert len(list((tmp_path / "env" / "bases").iterdir())) == 1
    out = make_base(tmp_path / "b", progress=False, use_cache=False, **{**TINY, "seed": 2})
    assert (out / "model.safetensors").is_file()
    assert len(list((tmp_path / "env" / "bases").iterdir())) == 1


def test_short_pretraining_records_loss(tmp_path: Path) -> None:
    spec = {**TINY, "layers": 1, "pretrain_steps": 3, "seq_len": 16}
    out = make_base(tmp_path / "base", use_cache=False, progress=False, **spec)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["spec"]["pretrain_steps"] == 3
    assert 0 < meta["pretrain_final_loss"] < 10


def test_bad_arguments_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed values: llama, mistral, qwen2"):
        make_base(tmp_path / "x", arch="gpt2", cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="multiple of heads"):
        make_base(tmp_path / "x", hidden=30, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        make_base(tmp_path / "x", vocab_size=100, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "x").exists()


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_make_base_and_make_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASWARM_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    args = ["make-base", str(tmp_path / "m"), "--arch", "mistral", "--layers", "1", "--hidden", "32"]
    res = runner.invoke(_app(), [*args, "--pretrain-steps", "0", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "wrote mistral base model to" in res.output and str(tmp_path / "m") in res.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "mistral"

    res = runner.invoke(_app(), ["make-base", str(tmp_path / "n"), "--arch", "gpt2", "--no-cache"])
    assert res.exit_code != 0 and "allowed values" in res.output

    res = runner.invoke(_app(), ["make-data", str(tmp_path / "d"), "--n-train", "5", "--n-eval", "2"])
    assert res.exit_code == 0, res.output
    train = (tmp_path / "d" / "train.jsonl").read_text().splitlines()
    evals = (tmp_path / "d" / "eval.jsonl").read_text().splitlines()
    assert len(train) == 5 and len(evals) == 2
    assert json.loads(train[0])["text"].startswith("recipe: ")

    res = runner.invoke(_app(), ["make-base", "--help"])
    assert res.exit_code == 0 and "--pretrain-steps" in res.output and "--no-cache" in res.output
