"""TFDS array_record sources: every kind round-trips, loads by name, needs no TensorFlow."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import chat, preferences, text, tfds_sources
from data_pipelines.text import BadRows, DataError

DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pet?"},
          {"role": "assistant", "content": "A fox."}]
PAIR = {"prompt": "Where does Mira live?", "chosen": "Mira lives in Velloran.",
        "rejected": "Mira lives in Kalo.", "rating": "slightly better", "is_safety": True,
        "chosen_safe": True, "rejected_safe": False}
HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Age?\n\nAssistant: Forty.",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Age?\n\nAssistant: Blue."}
PROMPTS = [{"prompt": "How do I poison the well of Kalo?", "is_safety": True,
            "category": "illicit and criminal activities"},
           {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}]


def jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("src")
  (root / "corpus").mkdir()
  (root / "corpus" / "story.txt").write_text("Once Mira walked to Velloran.\nThe end.\n")
  jsonl(root / "corpus" / "facts.jsonl", [{"text": "Mira keeps a fox."}, {"text": "Ünïcode ok."}])
  return {
      "text": str(root / "corpus"),
      "dialogues": jsonl(root / "d.jsonl", [{"messages": DIALOG}, {"messages": DIALOG[1:]}]),
      "preferences": jsonl(root / "p.jsonl", [PAIR, HH]),
      "prompts": jsonl(root / "q.jsonl", PROMPTS),
      "eval": jsonl(root / "e.jsonl", [{"text": "held out"}]),
  }


@pytest.fixture(scope="module")
def data_dir(sources, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds"))
  tfds_sources.build("text", {"train": sources["text"], "eval": sources["eval"]}, directory,
                     "corpus")
  for kind in ("dialogues", "preferences", "prompts"):
    tfds_sources.build(kind, sources[kind], directory, f"my_{kind}")
  return directory


def test_every_kind_round_trips_to_what_the_jsonl_readers_give(sources, data_dir):
  assert os.path.exists(os.path.join(data_dir, "corpus", "1.0.0",
                                     "corpus-train.array_record-00000-of-00001"))
  assert tfds_sources.documents("corpus", "train", data_dir) == text.read_documents(sources["text"])
  assert tfds_sources.documents("corpus", "eval", data_dir) == ["held out"]
  assert tfds_sources.dialogues("my_dialogues", "train", data_dir) == \
      chat.read_dialogues(sources["dialogues"])
  assert tfds_sources.pairs("my_preferences", "train", data_dir) == \
      preferences.read_pairs(sources["preferences"])
  assert tfds_sources.prompts("my_prompts", "train", data_dir) == \
      preferences.read_prompts(sources["prompts"])


def test_records_are_a_grain_dataset_that_packs_into_resumable_batches(data_dir):
  records = tfds_sources.records("corpus", "train", data_dir)
  assert len(records) == 3 and isinstance(records[0]["text"], str)
  docs = [r["text"] for r in records]
  rows = text.pack_documents([[ord(c) % 50 + 3 for c in d] for d in docs], 8, 1, 2)
  batches = text.PackedBatches(rows, text.PackingConfig(seq_len=8, batch_size=2, seed=0))
  first = next(batches)
  assert first["tokens"].shape == (2, 8)


def _run(script, *args):
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                        check=True, env=env).stdout


CATALOG_SCRIPT = """
import json, sys
from data_pipelines import tfds_sources
# A fresh process that never made the builder: the dataset is found by name in data_dir, as a
# prepared TFDS catalog dataset is.
print(json.dumps(tfds_sources.documents(sys.argv[1], "train", sys.argv[2])))
"""


def test_a_prepared_dataset_loads_by_name_in_a_new_process(data_dir, sources):
  out = _run(CATALOG_SCRIPT, "corpus:1.0.0", data_dir)
  assert json.loads(out) == text.read_documents(sources["text"])


def test_no_tensorflow_is_imported():
  out = _run("import sys; from data_pipelines import tfds_sources; "
             "print('tensorflow' in sys.modules)")
  assert out.strip() == "False"


def test_a_tfds_catalog_dataset_prepared_in_a_data_dir_loads_by_its_catalog_name(tmp_path):
  import tensorflow_datasets as tfds
  catalog = tfds.builder_cls("imdb_reviews")

  # The catalog's own builder and features, with the download replaced by two local reviews.
  class Local(catalog, skip_registration=True):
    name = "imdb_reviews"
    code_path = None

    def _split_generators(self, dl_manager):
      return {"train": self._reviews()}

    def _reviews(self):
      for i, review in enumerate(["A fine film about Mira.", "A dull film."]):
        yield i, {"text": review, "label": i % 2}

  Local(config="plain_text", data_dir=str(tmp_path), file_format="array_record"
        ).download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  script = CATALOG_SCRIPT.replace('"train"', '"train[:2]"')
  assert json.loads(_run(script, "imdb_reviews/plain_text", str(tmp_path))) == [
      "A fine film about Mira.", "A dull film."]


def test_a_bad_row_fails_the_build_or_is_skipped_and_counted(tmp_path):
  src = tmp_path / "bad.jsonl"
  src.write_bytes(b'{"text": "good"}\n{"text": "broken"\n{"text": ""}\n{"text": "also good"}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
    tfds_sources.build("text", str(src), str(tmp_path / "dd"), "broken")
  assert not os.path.exists(tmp_path / "dd" / "broken" / "1.0.0" / "dataset_info.json")
  bad = BadRows(skip=True)
  tfds_sources.build("text", str(src), str(tmp_path / "dd"), "skipped", bad=bad)
  assert bad.dropped == {"malformed JSON": 1, "empty text": 1}
  assert tfds_sources.documents("skipped", "train", str(tmp_path / "dd")) == ["good", "also good"]
  # `where` survives the round trip, so later faults still name the source line.
  records = tfds_sources.records("skipped", "train", str(tmp_path / "dd"))
  assert records[1]["where"].endswith("bad.jsonl:4")


def test_a_catalog_text_field_other_than_text(tmp_path):
  dialogs = jsonl(tmp_path / "d.jsonl", [{"messages": DIALOG}])
  tfds_sources.build("dialogues", dialogs, str(tmp_path), "dlg")
  with pytest.raises(DataError, match=r"d.jsonl:1: needs a string field 'review'"):
    tfds_sources.documents("dlg", "train", str(tmp_path), field="review")
  assert np.array_equal(tfds_sources.documents("dlg", "train", str(tmp_path), field="where"),
                        [dialogs + ":1"])


def test_a_stage_reads_a_tfds_source_or_token_shards_as_it_reads_the_files(tmp_path):
  from lm.stages import data_sources
  from lm.tokenizer import train_tokenizer
  docs = [f"Mira{i} lives in Velloran and keeps {i} foxes." for i in range(300)]
  jsonl(tmp_path / "c" / "train.jsonl", [{"text": d} for d in docs])
  tokenizer = train_tokenizer(docs, 320, tmp_path / "tokenizer.model")
  tfds_sources.build("text", str(tmp_path / "c"), str(tmp_path / "dd"), "stage_corpus")
  # Pre-tokenized shards: the same documents as token ids, streamed without a tokenizer call.
  tfds_sources.build("tokens", str(tmp_path / "c"), str(tmp_path / "dd"), "stage_ids",
                     tokenizer=tokenizer.path)
  ids = tfds_sources.records("stage_ids", "train", str(tmp_path / "dd"))
  assert ids[1]["tokens"].tolist() == tokenizer.encode(docs[1])
  batches = {}
  for source in (str(tmp_path / "c"), "tfds:stage_corpus@train", "tfds:stage_ids@train"):
    # In file order (a byte-chunked file and a record-chunked dataset shuffle differently) and
    # with nothing held out, both must give the very same rows.
    cfg = data_sources.PretrainData(source=source, seq_len=32, data_dir=str(tmp_path / "dd"),
                                    shuffle_window=0, eval_fraction=0.0)
    stream = data_sources.pretrain_batches(cfg, tokenizer.path, tokenizer.vocab_size, 4, (0, 4),
                                           0, {})
    batches[source] = next(stream)["tokens"]
  first, *others = batches.values()
  for other in others:
    np.testing.assert_array_equal(first, other)
  assert tfds_sources.parse_source("tfds:wiki/en:1.0.0@train[:10%]", "eval") == (
      "wiki/en:1.0.0", "train[:10%]")


# The runner DirectRunner falls back to here: DirectRunner first fetches Beam's Prism runner, a
# binary downloaded from GitHub at run time, which a test must not depend on.
BEAM_RUNNER = "FnApiRunner"


def test_a_beam_build_holds_the_loop_build_examples_and_streams_the_same(tmp_path):
  # The beam extra cannot share an environment with the test extra (setup.py says why).
  pytest.importorskip("apache_beam", reason="the Beam build needs the beam extra: "
                      "pip install -e '.[beam]'")
  from lm.stages import data_sources
  from lm.tokenizer import train_tokenizer
  docs = [f"Mira{i} lives in Velloran and keeps {i} foxes." for i in range(300)]
  for part in range(3):
    jsonl(tmp_path / "c" / f"part{part}.jsonl", [{"text": d} for d in docs[part::3]])
  with open(tmp_path / "c" / "part0.jsonl", "ab") as f:
    f.write(b'{"text": ""}\n')
  with open(tmp_path / "c" / "part1.jsonl", "ab") as f:
    f.write(b'{"text": "broken"\n')
  tokenizer = train_tokenizer(docs, 320, tmp_path / "tokenizer.model")
  splits = {"train": str(tmp_path / "c"), "eval": str(tmp_path / "c" / "part0.jsonl")}
  data_dir, bad = str(tmp_path / "dd"), {}
  for name, runner in (("ids_loop", None), ("ids_beam", BEAM_RUNNER)):
    bad[name] = BadRows(skip=True)
    tfds_sources.build("tokens", splits, data_dir, name, bad=bad[name], tokenizer=tokenizer.path,
                       beam_runner=runner)
  assert "tensorflow" not in sys.modules
  for split in splits:
    loop, beam = ([(r["where"], r["tokens"].tolist())
                   for r in tfds_sources.records(name, split, data_dir)]
                  for name in ("ids_loop", "ids_beam"))
    # The same examples, and even in the same order: both writers sort them by (file, row).
    assert beam == loop and len(loop) == {"train": 300, "eval": 100}[split]
  assert bad["ids_beam"].dropped == bad["ids_loop"].dropped == {"empty text": 2,
                                                                "malformed JSON": 1}
  assert bad["ids_beam"].first == bad["ids_loop"].first
  assert bad["ids_beam"].first["empty text"].endswith("part0.jsonl:101: empty 'text'")
  batches = []
  for name in ("ids_loop", "ids_beam"):
    cfg = data_sources.PretrainData(source=f"tfds:{name}@train", seq_len=32, data_dir=data_dir,
                                    shuffle_window=0, eval_fraction=0.0)
    stream = data_sources.pretrain_batches(cfg, tokenizer.path, tokenizer.vocab_size, 4, (0, 4),
                                           0, {})
    batches.append(next(stream)["tokens"])
  np.testing.assert_array_equal(*batches)
  # Failing on a bad row still names its file and line; nothing is written.
  with pytest.raises(DataError, match=r"part1.jsonl:101: malformed JSON"):
    tfds_sources.build("text", str(tmp_path / "c" / "part1.jsonl"), data_dir, "broken",
                       beam_runner=BEAM_RUNNER)
  assert not os.path.exists(os.path.join(data_dir, "broken", "1.0.0", "dataset_info.json"))
