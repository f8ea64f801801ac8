"""Pipeline files: what `mlbus pipelines apply` accepts, what it rejects (naming the line,
publishing nothing), and revisions (the next one from the log; none for the same content)."""

from __future__ import annotations

import pytest

from mlbus.consumers.workflow.commands import list_pipelines
from mlbus.consumers.workflow.definitions import InvalidPipeline, apply, parse, sweep_points
from mlbus.settings import LimitsSettings
from tests.consumers.workflow.support import DIGITS_YAML, pipeline_text
from tests.mlbus.kafka.support import read_events
from tests.mlbus.test_cli import clean_env, mlbus, ok, one_line_error

DIGITS = DIGITS_YAML.read_text()


def line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


def test_the_shipped_digits_pipeline_is_valid():
    pipeline = parse(DIGITS, source="digits.yaml", actor="ci")
    assert (pipeline.name, pipeline.dataset, pipeline.model, pipeline.family) == (
        "digits",
        "digits",
        "digits",
        "cnn",
    )
    assert pipeline.policy.name == "digits-accuracy" and pipeline.source == DIGITS
    assert [t.metric for t in pipeline.policy.thresholds] == [
        "test.accuracy",
        "inference.latency_p95_ms",
    ]


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (("family: cnn", "family: transformer"), "family: transformer",
         "family: unknown model family 'transformer'"),
        (("dataset: digits ", "# no dataset "), "name: digits", "dataset: missing (required"),
        (("metric: inference.latency_p95_ms", "metric: inference.latency_p99_ms"),
         "latency_p99_ms", "policy.thresholds[1].metric: the trainer does not report a metric "
         "'inference.latency_p99_ms'"),
        (("channels: 16", "channels: 0"), "channels: 0",
         "hyperparameters.channels: hyperparameter channels=0 is out of range"),
        (("lr: 0.001", "learning_rate: 0.001"), "learning_rate",
         "hyperparameter 'learning_rate' is not one of cnn's"),
        (("metric: test.accuracy    #", "metric: accuracy    #"), "metric: accuracy",
         "policy.metric: the trainer does not report a metric 'accuracy'"),
        (("margin: 0.0 ", "margin: -1 "), "margin: -1", "policy.margin: Input should be"),
        (("debounce_seconds: 2", "debounce_seconds: soon"), "debounce_seconds: soon",
         "debounce_seconds: Input should be a valid number"),
        (("family: cnn", "family: cnn\ntask: regression"), "metric: test.accuracy    #",
         "policy.metric: the trainer does not report a metric 'test.accuracy' for a regression"),
        (("family: cnn", "family: cnn\ntask: ranking"), "task: ranking",
         "task: family 'cnn' does not support task 'ranking'"),
    ],
)  # fmt: skip
def test_a_bad_file_is_rejected_naming_the_line(change, where, message):
    old, new = change
    assert old in DIGITS
    text = DIGITS.replace(old, new, 1)
    with pytest.raises(InvalidPipeline) as raised:
        parse(text, source="digits.yaml")
    assert str(raised.value).startswith(f"digits.yaml line {line_of(text, where)}: ")
    assert message in str(raised.value)


def test_bad_sweep_values_and_bad_yaml_name_their_line():
    text = pipeline_text(extra="sweep:\n  hidden: [16, 99999]\n")
    line = line_of(text, "99999")
    with pytest.raises(InvalidPipeline, match=rf"^p\.yaml line {line}: sweep\.hidden\[1\]: "):
        parse(text, source="p.yaml")
    with pytest.raises(
        InvalidPipeline, match=r"^p\.yaml line 4: not valid YAML \(while parsing a flow sequence in"
    ):
        parse("name: x\ndataset: y\nmodel: [unclosed\n", source="p.yaml")


def test_a_sweep_is_the_grid_of_its_values():
    text = pipeline_text(extra="sweep: {hidden: [16, 32], dropout: [0.0, 0.2, 0.4]}\n")
    points = sweep_points(parse(text))
    assert len(points) == 6 and points[0] == {"hidden": 16, "dropout": 0.0}


def test_apply_publishes_revisions_and_nothing_when_bad_or_unchanged(kafka, tmp_path):
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path / "data"),
        MLBUS_KAFKA__FETCH_WAIT_MAX_MS="10",
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(DIGITS.replace("family: cnn", "family: transformer"))
    one_line_error(
        mlbus("pipelines", "apply", str(bad), env=env),
        f"bad.yaml line {line_of(DIGITS, 'family: cnn')}: family: unknown",
    )
    assert read_events(kafka, "pipeline.defined") == []

    good = tmp_path / "digits.yaml"
    good.write_text(DIGITS)
    out = ok(mlbus("pipelines", "apply", str(good), "--actor", "user:ann", env=env)).stdout
    assert "pipeline digits defined: revision 1" in out
    good.write_text("# a comment changes nothing\n" + DIGITS)
    out = ok(mlbus("pipelines", "apply", str(good), "--actor", "user:bob", env=env)).stdout
    assert "pipeline digits unchanged: revision 1 is in force" in out
    updated = apply(
        kafka, DIGITS.replace("margin: 0.0 ", "margin: 0.01 "), source="d.yaml", actor="user:bob"
    )
    assert updated.published and updated.message == "pipeline digits updated: revision 2"

    revisions = [e.data for e in read_events(kafka, "pipeline.defined")]
    assert [(r.revision, r.policy.margin, r.actor) for r in revisions] == [
        (1, 0.0, "user:ann"),
        (2, 0.01, "user:bob"),
    ]
    (listed,) = list_pipelines(kafka)
    assert (listed["name"], listed["revision"], listed["policy"]["margin"]) == ("digits", 2, 0.01)


#: "Billion laughs": nine levels of nine aliases each, under 400 bytes, would expand to 9**9
#: strings when walked.
LAUGHS = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{level}: &{level} [{','.join(['*' + previous] * 9)}]"
            for previous, level in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "name: laughs",
    ]
)


def test_an_alias_bomb_is_refused_before_it_expands():
    assert len(LAUGHS.encode()) < 420
    with pytest.raises(InvalidPipeline) as raised:
        parse(LAUGHS, source="laughs.yaml")
    assert str(raised.value) == (
        "laughs.yaml line 2: YAML aliases (*a) are not allowed in a pipeline file: "
        "write the value out"
    )
    # An alias anywhere, even a harmless one, is refused; an anchor alone is no harm.
    reused = pipeline_text(extra="sweep:\n  hidden: &sizes [16, 32]\n  layers: *sizes\n")
    with pytest.raises(InvalidPipeline, match=r"line \d+: YAML aliases \(\*sizes\)"):
        parse(reused, source="p.yaml")
    assert parse(pipeline_text(extra="sweep:\n  hidden: &sizes [16, 32]\n")).sweep


def test_a_file_over_the_size_limit_is_refused_unparsed():
    text = pipeline_text() + "#" * 2048 + "\n"
    limits = LimitsSettings(max_pipeline_bytes=2048)
    with pytest.raises(InvalidPipeline) as raised:
        parse(text, source="big.yaml", limits=limits)
    assert str(raised.value) == (
        f"big.yaml: {len(text)} bytes, over the limit of 2048 bytes for a pipeline file "
        "(MLBUS_LIMITS__MAX_PIPELINE_BYTES)"
    )
    assert parse(text, source="big.yaml").name == "p1"  # the default limit takes it


def test_a_sweep_over_the_cap_is_refused_naming_its_size():
    """About 2 KB of YAML asking for 432,000 runs."""
    hidden = list(range(1, 301))
    dropout = [round(0.01 * i, 2) for i in range(90)]
    text = pipeline_text(
        extra=f"sweep:\n  hidden: {hidden}\n  layers: {list(range(1, 17))}\n  dropout: {dropout}\n"
    )
    assert len(text) < 3000
    with pytest.raises(InvalidPipeline) as raised:
        parse(text, source="p.yaml")
    assert str(raised.value) == (
        f"p.yaml line {line_of(text, 'sweep:')}: sweep: 300 hidden x 16 layers x 90 dropout = "
        "432000 runs, over the limit of 1000 (MLBUS_LIMITS__MAX_SWEEP_RUNS)"
    )
    small = LimitsSettings(max_sweep_runs=5)
    six = pipeline_text(extra="sweep: {hidden: [16, 32], dropout: [0.0, 0.2, 0.4]}\n")
    with pytest.raises(InvalidPipeline, match="2 hidden x 3 dropout = 6 runs, over the limit of 5"):
        parse(six, limits=small)
    assert len(sweep_points(parse(six, limits=LimitsSettings(max_sweep_runs=6)))) == 6
