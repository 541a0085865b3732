"""wmss.datasource (the `data.select` stage) and `data.train` source specs, on local folders laid out like
hub datasets (a README.md whose `configs:` list each config's data files per split; JSONL and Parquet),
built here: subsets and splits, each filter kind, the cap, weighted mixes, ids, streaming in batches, the
errors, and the plain-string `data.train` that works as before."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wmss import datasource
from wmss.capacity import PAPER_SAMPLES, Assumptions, _sample_count
from wmss.config import SourceSpec, config_from_mapping, load_config
from wmss.data import BadRecordError, load_records
from wmss.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

def readme(ext: str) -> str:
    """A dataset card whose `configs:` name each config's data files per split, as on the hub (one format per
    dataset: `datasets` reads every config of a folder with one builder)."""
    files = "".join(f"""- config_name: {name}
  data_files:
  - split: train
    path: {name}/train.{ext}
  - split: test
    path: {name}/test.{ext}
""" for name in ("math", "chat"))
    return f"---\nconfigs:\n{files}---\n# a local dataset laid out like a hub one\n"


def math_row(i: int, split: str, answer: str | None = None, **extra) -> dict:
    """A chat record like AM-DeepSeek-R1-Distilled's: the reference answer in the first turn's `info`."""
    answer = str(i) if answer is None else answer
    return {"messages": [{"role": "user", "content": f"{split} problem {i}", "info": {"reference_answer": str(i)}},
                         {"role": "assistant", "content": f"<think>t</think><answer>\\boxed{{{answer}}}</answer>"}],
            "score": i / 10, "source": "even" if i % 2 == 0 else "odd", **extra}


def chat_row(i: int, split: str) -> dict:
    return {"id": f"{split}-{i}", "prompt": f"q{i}", "completion": f"a{i}", "score": i}


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def write_parquet(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def make_hub(root: Path, ext: str) -> Path:
    """Two configs, each with a train and a test split: `math` (10 train records, train 3 answering wrongly;
    3 test) and `chat` (prompt/completion records with ids; 6 train, 2 test)."""
    write = write_jsonl if ext == "jsonl" else write_parquet
    write(root / "math" / f"train.{ext}", [math_row(i, "train", answer="99" if i == 3 else None) for i in range(10)])
    write(root / "math" / f"test.{ext}", [math_row(i, "test") for i in range(3)])
    for split, n in (("train", 6), ("test", 2)):
        write(root / "chat" / f"{split}.{ext}", [chat_row(i, split) for i in range(n)])
    (root / "README.md").write_text(readme(ext))
    return root


@pytest.fixture
def hub(tmp_path) -> Path:
    return make_hub(tmp_path / "hub", "jsonl")


def select(tmp_path: Path, *specs: dict, **kwargs) -> list[dict]:
    """Run the stage on these specs; the output file's records."""
    out = tmp_path / "stage" / "train.parquet"
    outputs = datasource.select_records([SourceSpec(**s) for s in specs], out, **kwargs)
    assert outputs["train"] == str(out) and not list(out.parent.glob(".*parts"))  # no parts left behind
    return pq.read_table(out).to_pylist()


def prompts(rows: list[dict]) -> list[str]:
    return [r["messages"][0]["content"] if r.get("messages") else r["prompt"] for r in rows]


# ---- subsets and splits ----

@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_subset_and_split_choose_the_records(tmp_path, ext):
    hub = make_hub(tmp_path / "hub", ext)
    assert prompts(select(tmp_path, {"path": str(hub), "subset": "math", "split": "test"})) == [
        "test problem 0", "test problem 1", "test problem 2"]
    rows = select(tmp_path, {"path": str(hub), "subset": "chat"})  # split defaults to train
    assert [r["id"] for r in rows] == [f"train-{i}" for i in range(6)]  # their own ids, unprefixed
    assert rows[0]["completion"] == "a0"


def test_a_plain_folder_and_a_file_are_sources_too(tmp_path):
    write_jsonl(tmp_path / "plain" / "train.jsonl", [math_row(i, "train") for i in range(2)])
    write_jsonl(tmp_path / "plain" / "test.jsonl", [math_row(i, "test") for i in range(4)])
    assert len(select(tmp_path, {"path": str(tmp_path / "plain"), "split": "test"})) == 4
    rows = select(tmp_path, {"path": str(tmp_path / "plain" / "train.jsonl")})
    assert [r["id"] for r in rows] == ["0", "1"]  # the record number, as wmss.data numbers records


def test_an_unknown_subset_or_split_names_the_source(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hub \(subset 'algebra', split 'train'\)"):
        select(tmp_path, {"path": str(hub), "subset": "algebra"})
    with pytest.raises(FileNotFoundError, match=r"subset 'math', split 'validation'"):
        select(tmp_path, {"path": str(hub), "subset": "math", "split": "validation"})
    write_jsonl(tmp_path / "one.jsonl", [math_row(0, "train")])
    with pytest.raises(ValueError, match="no subsets"):
        select(tmp_path, {"path": str(tmp_path / "one.jsonl"), "subset": "math"})


# ---- filters ----

@pytest.mark.parametrize("condition, kept", [
    ({"field": "source", "equals": "even"}, [0, 2, 4, 6, 8]),
    ({"field": "source", "one_of": ["odd", "none"]}, [1, 3, 5, 7, 9]),
    ({"field": "messages.0.content", "regex": r"problem [0-2]$"}, [0, 1, 2]),
    ({"field": "score", "min": 0.25, "max": 0.5}, [3, 4, 5]),
    ({"field": "messages.-1.content", "boxed_equals": "messages.0.info.reference_answer"}, [0, 1, 2, 4, 5, 6, 7, 8, 9]),
])
def test_each_filter_kind(hub, tmp_path, condition, kept):
    rows = select(tmp_path, {"path": str(hub), "subset": "math", "filter": condition})
    assert prompts(rows) == [f"train problem {i}" for i in kept]
    assert [r["id"] for r in rows] == [str(i) for i in kept]  # ids: the record numbers in the source


def test_filters_all_hold_and_boxed_equals_is_mathematical(tmp_path):
    rows = [math_row(0, "train", answer="0.5"), math_row(1, "train", answer="\\frac{1}{2}"),
            math_row(2, "train", answer="3")]
    for row in rows:
        row["messages"][0]["info"]["reference_answer"] = "1/2"
    write_jsonl(tmp_path / "d.jsonl", rows)
    boxed = {"field": "messages.-1.content", "boxed_equals": "messages.0.info.reference_answer"}
    assert prompts(select(tmp_path, {"path": str(tmp_path / "d.jsonl"), "filter": boxed})) == [
        "train problem 0", "train problem 1"]
    kept = select(tmp_path, {"path": str(tmp_path / "d.jsonl"), "filter": [boxed, {"field": "source", "equals": "even"}]})
    assert prompts(kept) == ["train problem 0"]


def test_a_missing_filter_field_names_the_source_record_and_field(tmp_path):
    rows = [math_row(0, "train"), math_row(1, "train")]
    del rows[1]["messages"][0]["info"]
    write_jsonl(tmp_path / "d.jsonl", rows)
    spec = {"path": str(tmp_path / "d.jsonl"),
            "filter": {"field": "messages.-1.content", "boxed_equals": "messages.0.info.reference_answer"}}
    with pytest.raises(BadRecordError, match=r"d\.jsonl, line 2, field 'messages\.0\.info\.reference_answer': "
                                             r"missing.*on_missing: drop"):
        select(tmp_path, spec)
    spec["filter"]["on_missing"] = "drop"
    assert prompts(select(tmp_path, spec)) == ["train problem 0"]
    with pytest.raises(BadRecordError, match=r"line 1, field 'score': the filter needs a string, got float"):
        select(tmp_path, {"path": str(tmp_path / "d.jsonl"), "filter": {"field": "score", "regex": "1"}})


# ---- the cap, mixes, ids ----

def test_the_cap_keeps_the_first_records_that_pass(hub, tmp_path):
    rows = select(tmp_path, {"path": str(hub), "subset": "math", "max_samples": 3,
                             "filter": {"field": "source", "equals": "odd"}})
    assert [r["id"] for r in rows] == ["1", "3", "5"]


def test_a_weighted_mix_takes_each_sources_share(hub, tmp_path):
    hub_parquet = make_hub(tmp_path / "hub-parquet", "parquet")  # a mix of a JSONL and a Parquet dataset
    math, chat = {"path": str(hub), "subset": "math"}, {"path": str(hub_parquet), "subset": "chat"}
    # 10 math and 6 chat records at 3:1: the mix is as large as the scarcer source allows, 10 + 3
    rows = select(tmp_path, {**math, "weight": 3}, {**chat, "weight": 1})
    assert [r["id"] for r in rows] == [f"0:{i}" for i in range(10)] + [f"1:train-{i}" for i in range(3)]
    # 1:1 with chat the scarcer: 6 + 6
    rows = select(tmp_path, {**math, "weight": 0.5}, {**chat, "weight": 0.5})
    assert [r["id"] for r in rows] == [f"0:{i}" for i in range(6)] + [f"1:train-{i}" for i in range(6)]
    # without weights: every selected record of each, one source after the other
    rows = select(tmp_path, math, chat)
    assert len(rows) == 16 and len({r["id"] for r in rows}) == 16
    # the output is ordinary training data: both record shapes, the ids kept
    records, report = load_records(tmp_path / "stage" / "train.parquet")
    assert report.n_records == 16 and records[0].id == "0:0" and records[-1].id == "1:train-5"
    assert records[0].chat and not records[-1].chat


def test_the_mixed_sizes_are_exact():
    assert datasource.mix_sizes([10, 6], [3, 1]) == [10, 3]
    assert datasource.mix_sizes([10, 6], [0.3, 0.7]) == [2, 6]
    assert datasource.mix_sizes([10, 0], [1, 1]) == [0, 0]
    assert datasource.mix_sizes([4, 5], [None, None]) == [4, 5]


def test_the_output_is_deterministic(hub, tmp_path):
    specs = ({"path": str(hub), "subset": "math", "weight": 2, "filter": {"field": "score", "min": 0.2}},
             {"path": str(hub), "subset": "chat", "weight": 1})
    first = (select(tmp_path, *specs), (tmp_path / "stage" / "train.parquet").read_bytes())
    assert (select(tmp_path, *specs), (tmp_path / "stage" / "train.parquet").read_bytes()) == first


def test_sources_are_streamed_in_batches(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(datasource, "BATCH", 3)  # 10 records: 4 parts; a cap in the middle of one
    write_jsonl(tmp_path / "big.jsonl", [math_row(i, "train") for i in range(10)])
    assert [r["id"] for r in select(tmp_path, {"path": str(tmp_path / "big.jsonl")})] == [str(i) for i in range(10)]
    rows = select(tmp_path, {"path": str(hub), "subset": "math", "max_samples": 7})
    assert [r["id"] for r in rows] == [str(i) for i in range(7)]
    # records whose fields differ between batches share one schema: a field some lack is null there
    write_jsonl(tmp_path / "ragged.jsonl", [math_row(i, "train", **({"note": "x"} if i == 8 else {}))
                                            for i in range(10)])
    rows = select(tmp_path, {"path": str(tmp_path / "ragged.jsonl")})
    assert [r["note"] for r in rows] == [None] * 8 + ["x", None]


def test_a_hub_source_is_streamed_and_read_only_up_to_its_cap(tmp_path, monkeypatch):
    asked = []

    def load_dataset(path, **kwargs):
        asked.append((path, kwargs))
        return (math_row(i, "train") if i < 5 else pytest.fail("read past the cap") for i in range(10 ** 6))

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    rows = select(tmp_path, {"path": "org/data", "subset": "am", "revision": "abc", "max_samples": 5})
    assert len(rows) == 5
    assert asked == [("org/data", {"name": "am", "split": "train", "streaming": True, "revision": "abc"})]
    inputs = datasource.source_inputs([SourceSpec(path="org/data", revision="abc")])
    assert inputs["source0"].hash == "id:org/data@abc"


def test_unreadable_records_follow_on_bad_record(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [math_row(0, "train"), "{not json", math_row(2, "train")])
    spec = {"path": str(tmp_path / "d.jsonl")}
    with pytest.raises(BadRecordError, match=r"d\.jsonl, line 2: invalid JSON"):
        select(tmp_path, spec)
    assert [r["id"] for r in select(tmp_path, spec, on_bad_record="skip")] == ["0", "2"]
    (reject,) = [json.loads(line) for line in (tmp_path / "stage" / "rejects.jsonl").read_text().splitlines()]
    assert reject["location"] == "line 2" and reject["record"] == "{not json"


def test_nothing_selected_is_an_error(hub, tmp_path):
    with pytest.raises(BadRecordError, match=r"no records selected.*subset 'math', split 'train'\): 0"):
        select(tmp_path, {"path": str(hub), "subset": "math", "filter": {"field": "source", "equals": "none"}})


# ---- the config ----

def test_bad_specs_are_config_errors_that_name_the_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  train:\n    path: d.jsonl\n    spilt: test\n")
    with pytest.raises(ConfigError, match=r"data\.train\.spilt = 'test': unknown key"):
        load_config(config)
    cases = {"data.train.1.pth = 'x': unknown key": [{"path": "a"}, {"pth": "x"}],
             "data.train.filter.0: the filter on 'a' needs exactly one test .* it has equals, regex":
                 {"path": "a", "filter": {"field": "a", "equals": 1, "regex": "x"}},
             "data.train.filter.0.on_missing = 'skip': not allowed":
                 {"path": "a", "filter": {"field": "a", "equals": 1, "on_missing": "skip"}},
             "data.train: a source's weight applies in a mix": {"path": "a", "weight": 1},
             r"data.train: a source's weight .* every source needs one": [{"path": "a", "weight": 1}, {"path": "b"}],
             "data.train.max_samples = 0": {"path": "a", "max_samples": 0},
             "regex '\\(' is not a valid regular expression": {"path": "a", "filter": {"field": "a", "regex": "("}}}
    for message, train in cases.items():
        with pytest.raises(ConfigError, match=message):
            config_from_mapping({"data": {"train": train}})


def test_a_plain_string_is_read_as_before(tmp_path):
    config = config_from_mapping({"data": {"train": "records.jsonl"}})
    assert config.data.train == "records.jsonl" and config.data.sources() is None
    assert config_from_mapping({}).data.train == "demo"
    one = config_from_mapping({"data": {"train": {"path": "a", "filter": {"field": "x", "equals": 1}}}})
    assert [s.path for s in one.data.sources()] == ["a"] and one.data.sources()[0].filter[0].equals == 1


def test_the_paper_configs_select_the_math_subset_and_plan_offline():
    for name in ("qwen3-8b", "qwen3-4b"):
        config = load_config(REPO / "configs" / f"{name}.yaml")
        sources = config.data.sources()
        assert [(s.path, s.subset, s.split) for s in sources] == [
            ("a-m-team/AM-DeepSeek-R1-Distilled-1.4M", "am_0.5M", "train"),
            ("a-m-team/AM-DeepSeek-R1-Distilled-1.4M", "am_0.9M", "train")]
        assert all(s.filter[1].boxed_equals == "messages.0.info.reference_answer" for s in sources)
        assert _sample_count(config, Assumptions()) == PAPER_SAMPLES
    capped = config_from_mapping({"data": {"train": [{"path": "a", "max_samples": 5}, {"path": "b", "max_samples": 7}]}})
    assert _sample_count(capped, Assumptions()) == 12
    assert _sample_count(config_from_mapping({"data": {"train": {"path": "a"}}}), Assumptions()) is None


def test_the_paper_filter_keeps_verified_boxed_answers(tmp_path):
    spec = load_config(REPO / "configs" / "qwen3-8b.yaml").data.sources()[0]
    rows = [math_row(0, "train"), math_row(1, "train", answer="7"), math_row(2, "train")]
    rows[2]["messages"][1]["content"] = "<think>t</think> the answer is \\boxed{2}"  # no <answer> block
    rows.append({"messages": [{"role": "user", "content": "code task", "info": {"reference_answer": None}},
                              {"role": "assistant", "content": "<think>t</think><answer>\\boxed{3}</answer>"}]})
    write_jsonl(tmp_path / "am.jsonl", rows)
    paper = spec.model_dump(exclude={"path", "subset", "revision"})
    assert prompts(select(tmp_path, {**paper, "path": str(tmp_path / "am.jsonl")})) == ["train problem 0"]


def test_the_workflow_runs_the_selection_as_stage_data_select(hub, tmp_path):
    from wmss.workflow import StageContext, StageResult
    from workflows.wmss_pipeline import shared_inputs

    class Stages:  # the stage engine's interface, running each stage in a folder of its own
        def __init__(self):
            self.ran = {}

        def stage(self, name, settings, inputs, fn):
            self.ran[name] = (settings, inputs)
            folder = tmp_path / "run" / name
            folder.mkdir(parents=True)
            return StageResult(fn(StageContext(folder, None, str(folder), None)), f"hash-of-{name}")

    spec = {"path": str(hub), "subset": "chat", "max_samples": 2}
    cfg = config_from_mapping({"data": {"train": spec}, "models": {"base": "base-model", "strong": "strong-model"}})
    wf = Stages()
    data = shared_inputs(cfg, wf)["data"]
    assert list(wf.ran) == ["data.select"] and data.hash == "hash-of-data.select"
    settings, inputs = wf.ran["data.select"]
    assert settings["sources"][0]["subset"] == "chat"
    assert not inputs["source0"].hash.startswith("id:")  # a local folder: by its content
    assert [r.id for r in load_records(data.path)[0]] == ["train-0", "train-1"]
    plain = config_from_mapping({"data": {"train": "records.jsonl"}, "models": {"base": "b", "strong": "s"}})
    wf = Stages()
    assert shared_inputs(plain, wf)["data"].path == "records.jsonl" and not wf.ran  # read as it is, as before
