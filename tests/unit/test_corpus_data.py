"""Generated corpora and the data pipeline: loading, packing, splitting, sharding, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swarm import corpus
from swarm.config import DataSettings
from swarm.data import batches, load_round_data, load_texts, pack, shard, split_train_eval

pytestmark = pytest.mark.timeout(60)


class CharTokenizer:
    """A stand-in for a HF tokenizer: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        return {"input_ids": [[1 + ord(c) % 200 for c in t] for t in texts]}


def test_corpus_is_deterministic_per_seed() -> None:
    for domain in corpus.DOMAINS:
        a = corpus.generate(domain, 50, seed=3)  # type: ignore[arg-type]
        assert a == corpus.generate(domain, 50, seed=3)  # type: ignore[arg-type]
        assert a != corpus.generate(domain, 50, seed=4)  # type: ignore[arg-type]
        assert len(a) == 50 and all(isinstance(t, str) and t for t in a)


def test_corpus_domains_differ_but_share_words() -> None:
    pre = corpus.generate("pretrain", 300)
    fin = corpus.generate("finetune", 300)
    assert all(t.startswith("recipe: ") and t.endswith("| end") for t in fin)
    assert not any(t.startswith("recipe: ") for t in pre)
    pre_words = {w for t in pre for w in t.split()}
    fin_words = {w for t in fin for w in t.split()}
    assert len(fin_words & pre_words) / len(fin_words) > 0.5
    assert set("".join(fin)) <= set("".join(pre))  # every character of the finetune text is in pretrain


def test_corpus_rejects_unknown_domain() -> None:
    with pytest.raises(ValueError, match="allowed values: pretrain, finetune"):
        corpus.generate("poetry", 3)  # type: ignore[arg-type]


def test_write_jsonl_roundtrip(tmp_path: Path) -> None:
    texts = corpus.generate("finetune", 7)
    path = corpus.write_jsonl(texts, tmp_path / "sub" / "d.jsonl")
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == texts
    assert load_texts(path) == texts


def test_load_texts_formats_and_directory(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus.write_jsonl(["a b", "c"], tmp_path / "1.jsonl")
    (tmp_path / "2.txt").write_text("first line\n\n  \nsecond line\n")
    pq.write_table(pa.table({"text": ["p1", "p2"], "other": [1, 2]}), tmp_path / "3.parquet")
    (tmp_path / "4.json").write_text(json.dumps([{"text": "j1"}]))
    assert load_texts(tmp_path / "2.txt") == ["first line", "second line"]
    assert load_texts(tmp_path / "3.parquet") == ["p1", "p2"]
    assert load_texts(tmp_path / "4.json") == ["j1"]
    assert load_texts(tmp_path) == ["a b", "c", "first line", "second line", "p1", "p2", "j1"]


def test_load_texts_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match=r"unsupported.*'\.csv'.*\.jsonl, \.json, \.txt, \.parquet"):
        load_texts(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="holds no data file"):
        load_texts(tmp_path)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no 'text' field.*body"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "num.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match="record 0 .* int"):
        load_texts(tmp_path / "num.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(ValueError, match="could not read"):
        load_texts(tmp_path / "broken.jsonl")


def test_pack_shapes_and_eos() -> None:
    tok = CharTokenizer()
    seqs = pack(["abc", "de", "fghij"], tok, seq_len=4)  # 3+1 + 2+1 + 5+1 = 13 tokens -> 3 rows
    assert seqs.shape == (3, 4) and seqs.dtype == torch.long
    flat = seqs.flatten().tolist()
    assert flat[3] == 0 and flat[6] == 0  # EOS after each document
    assert torch.equal(seqs, pack(["abc", "de", "fghij"], tok, seq_len=4))
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack(["ab"], tok, seq_len=8)


def test_split_is_deterministic_disjoint_and_covering() -> None:
    seqs = torch.arange(100 * 3).view(100, 3)
    train, ev = split_train_eval(seqs, 0.1, seed=5)
    assert len(ev) == 10 and len(train) == 90
    rows = {tuple(r) for r in torch.cat([train, ev]).tolist()}
    assert rows == {tuple(r) for r in seqs.tolist()}
    t2, e2 = split_train_eval(seqs, 0.1, seed=5)
    assert torch.equal(train, t2) and torch.equal(ev, e2)
    assert not torch.equal(ev, split_train_eval(seqs, 0.1, seed=6)[1])
    with pytest.raises(ValueError, match=r"eval_fraction must be in \(0, 1\)"):
        split_train_eval(seqs, 1.0, seed=0)


def test_shard_is_disjoint_and_covering() -> None:
    seqs = torch.arange(23 * 2).view(23, 2)
    parts = [shard(seqs, 4, i) for i in range(4)]
    assert sum(len(p) for p in parts) == 23
    firsts = sorted(int(r[0]) for p in parts for r in p)
    assert firsts == seqs[:, 0].tolist()
    assert torch.equal(parts[1], shard(seqs, 4, 1))
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=r"shard index must be in \[0, 4\)"):
            shard(seqs, 4, bad)
    with pytest.raises(ValueError, match="num_shards"):
        shard(seqs, 0, 0)


def test_batches_deterministic_and_complete() -> None:
    seqs = torch.arange(10 * 2).view(10, 2)
    epoch0 = list(batches(seqs, 4, seed=1, epoch=0))
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(int(r[0]) for b in epoch0 for r in b) == seqs[:, 0].tolist()
    assert all(torch.equal(a, b) for a, b in zip(epoch0, batches(seqs, 4, seed=1, epoch=0), strict=True))
    assert not torch.equal(torch.cat(epoch0), torch.cat(list(batches(seqs, 4, seed=1, epoch=1))))
    assert [len(b) for b in batches(seqs, 4, seed=1, drop_last=True)] == [4, 4]


def test_load_round_data_split_and_eval_path(tmp_path: Path) -> None:
    tok = CharTokenizer()
    corpus.write_jsonl(corpus.generate("finetune", 40), tmp_path / "train.jsonl")
    corpus.write_jsonl(corpus.generate("finetune", 10, seed=1), tmp_path / "eval.jsonl")
    settings = DataSettings(train_path=str(tmp_path / "train.jsonl"), seq_len=32, eval_fraction=0.2)
    parts = [load_round_data(settings, tok, shard_index=i, num_shards=2) for i in range(2)]
    assert torch.equal(parts[0][1], parts[1][1])  # every trainer sees the same eval set
    all_rows = pack(load_texts(settings.train_path), tok, 32)
    assert len(parts[0][0]) + len(parts[1][0]) + len(parts[0][1]) == len(all_rows)
    with_eval = settings.model_copy(update={"eval_path": str(tmp_path / "eval.jsonl")})
    train, ev = load_round_data(with_eval, tok)
    assert torch.equal(train, all_rows)
    assert torch.equal(ev, pack(load_texts(tmp_path / "eval.jsonl"), tok, 32))
    with pytest.raises(ValueError, match="train_path is empty"):
        load_round_data(DataSettings(), tok)
