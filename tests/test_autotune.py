"""The autotuner times each candidate once per (op, key), keeps the fastest, skips failures and stays off
(running nothing) wherever it is not enabled. Timing is a fake clock: no GPU needed."""

import pytest
import torch

from pdfkernels import autotune, settings

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def tuner(monkeypatch):
    """Tuning on as on a GPU (compiled, not interpreted), an empty cache, and a fake ``_bench`` that runs the
    launch once and reports the time the test assigned to that candidate."""
    monkeypatch.delenv(settings.AUTOTUNE.name, raising=False)
    monkeypatch.delenv(settings.AUTOTUNE_LOG.name, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # only read at call time, by backend.interpreting()
    autotune.clear()
    state = {"times": {}, "benched": []}

    def fake_bench(fn):
        fn()
        candidate = state["ran"][-1]
        state["benched"].append(candidate)
        return state["times"][candidate]

    state["ran"] = []
    monkeypatch.setattr(autotune, "_bench", fake_bench)
    yield state
    autotune.clear()


def runner(state, failing=()):
    def run(candidate):
        state["ran"].append(candidate)
        if candidate in failing:
            raise RuntimeError(f"out of resources: {candidate}")
    return run


def test_enabled_only_on_compiled_cuda(monkeypatch):
    assert autotune.enabled(CUDA)
    assert not autotune.enabled(CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not autotune.enabled(CUDA)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(settings.AUTOTUNE.name, "0")
    assert not autotune.enabled(CUDA)
    monkeypatch.setenv(settings.AUTOTUNE.name, "1")
    assert autotune.enabled(CUDA)


@pytest.mark.parametrize("device,env", [(CPU, None), (CUDA, "0")])
def test_disabled_returns_first_without_running(tuner, monkeypatch, device, env):
    if env is not None:
        monkeypatch.setenv(settings.AUTOTUNE.name, env)
    tuner["times"] = {"a": 3.0, "b": 1.0}
    assert autotune.pick("fwd", (1,), ["a", "b"], runner(tuner), device) == "a"
    assert tuner["ran"] == [] and tuner["benched"] == []
    assert autotune.chosen() == {}


def test_interpreter_returns_first_without_running(tuner, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tuner["times"] = {"a": 3.0, "b": 1.0}
    assert autotune.pick("fwd", (1,), ["a", "b"], runner(tuner), CUDA) == "a"
    assert tuner["ran"] == []


def test_single_candidate_is_not_timed(tuner):
    assert autotune.pick("fwd", (1,), ["only"], runner(tuner), CUDA) == "only"
    assert tuner["ran"] == [] and autotune.chosen() == {}


def test_fastest_is_picked_and_cached_per_key(tuner):
    tuner["times"] = {"a": 3.0, "b": 1.0, "c": 2.0}
    run = runner(tuner)
    assert autotune.pick("fwd", (64, "bf16"), ["a", "b", "c"], run, CUDA) == "b"
    assert tuner["benched"] == ["a", "b", "c"]

    assert autotune.pick("fwd", (64, "bf16"), ["a", "b", "c"], run, CUDA) == "b"
    assert tuner["benched"] == ["a", "b", "c"]  # cached: nothing timed again
    assert tuner["ran"] == ["a", "b", "c"]

    tuner["times"] = {"a": 0.5, "b": 1.0, "c": 2.0}
    assert autotune.pick("fwd", (128, "bf16"), ["a", "b", "c"], run, CUDA) == "a"  # new key: timed anew
    assert autotune.pick("bwd", (64, "bf16"), ["a", "b", "c"], run, CUDA) == "a"  # same key, other op
    assert tuner["benched"] == ["a", "b", "c"] * 3
    assert set(autotune.chosen()) == {("fwd", (64, "bf16")), ("fwd", (128, "bf16")), ("bwd", (64, "bf16"))}


def test_chosen_reports_times_and_is_a_copy(tuner):
    tuner["times"] = {"a": 3.0, "b": 1.0}
    autotune.pick("fwd", (1,), ["a", "b"], runner(tuner), CUDA)
    report = autotune.chosen()
    assert report == {("fwd", (1,)): {"choice": 1, "times_ms": [3.0, 1.0]}}
    report[("fwd", (1,))]["times_ms"].clear()
    report[("fwd", (1,))]["choice"] = 0
    assert autotune.chosen()[("fwd", (1,))] == {"choice": 1, "times_ms": [3.0, 1.0]}
    autotune.clear()
    assert autotune.chosen() == {}
    autotune.pick("fwd", (1,), ["a", "b"], runner(tuner), CUDA)
    assert tuner["benched"] == ["a", "b", "a", "b"]  # cleared: timed again


def test_failing_candidate_is_skipped(tuner):
    tuner["times"] = {"a": 3.0, "b": 1.0, "c": 2.0}
    assert autotune.pick("fwd", (1,), ["a", "b", "c"], runner(tuner, failing={"b"}), CUDA) == "c"
    assert tuner["ran"] == ["a", "b", "c"]
    assert autotune.chosen()[("fwd", (1,))] == {"choice": 2, "times_ms": [3.0, None, 2.0]}


def test_all_failing_raises_with_every_error(tuner):
    with pytest.raises(RuntimeError) as info:
        autotune.pick("bwd_dq", (7, "fp16"), ["a", "b"], runner(tuner, failing={"a", "b"}), CUDA)
    message = str(info.value)
    assert "bwd_dq" in message and "(7, 'fp16')" in message
    assert "out of resources: a" in message and "out of resources: b" in message
    assert autotune.chosen() == {}  # nothing cached: a later call tries again


def test_bad_env_value_is_refused(tuner, monkeypatch):
    monkeypatch.setenv(settings.AUTOTUNE.name, "yes")
    with pytest.raises(ValueError, match=r"PDFKERNELS_AUTOTUNE expected one of \('0', '1'\), got 'yes'"):
        autotune.pick("fwd", (1,), ["a", "b"], runner(tuner), CUDA)
    assert tuner["ran"] == []


def test_empty_candidates_are_refused(tuner):
    with pytest.raises(ValueError, match="no candidates"):
        autotune.pick("fwd", (1,), [], runner(tuner), CUDA)


def test_log_line_per_new_choice(tuner, monkeypatch, capsys):
    monkeypatch.setenv(settings.AUTOTUNE_LOG.name, "1")
    tuner["times"] = {"a": 3.0, "b": 1.0}
    autotune.pick("fwd", (1,), ["a", "b"], runner(tuner), CUDA)
    autotune.pick("fwd", (1,), ["a", "b"], runner(tuner), CUDA)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fwd" in err[0] and "candidate 1" in err[0] and "3.0000" in err[0]


def test_default_bench_is_triton_do_bench(monkeypatch):
    """Unpatched, ``_bench`` resolves to a wrapper over triton.testing.do_bench with the short budget."""
    import triton.testing

    calls = []

    def fake_do_bench(fn, warmup, rep):
        calls.append((warmup, rep))
        fn()
        return 0.25

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(autotune, "_bench", None)
    ran = []
    assert autotune.pick("fwd", (1,), ["a", "b"], ran.append, CUDA) == "a"  # tie: the earlier candidate
    assert ran == ["a", "b"]
    assert calls == [(autotune.WARMUP_MS, autotune.REP_MS)] * 2


@pytest.mark.parametrize("inside", ["capture", "compile"])
def test_never_times_inside_a_graph_capture_or_compile(tuner, monkeypatch, inside):
    """Inside a CUDA-graph capture or torch.compile's tracing: the cached choice, or the default untimed and not
    cached (the next eager call tunes)."""
    if inside == "capture":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    tuner["times"] = {"a": 3.0, "b": 1.0}
    run = runner(tuner)
    assert autotune.pick("fwd", (1,), ["a", "b"], run, CUDA) == "a"
    assert tuner["ran"] == [] and autotune.chosen() == {}
    monkeypatch.undo()  # eager again (the fixture's settings go too: restore them)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(autotune, "_bench", lambda fn: (fn(), tuner["times"][tuner["ran"][-1]])[1])
    assert autotune.pick("fwd", (1,), ["a", "b"], run, CUDA) == "b"  # the first eager call tunes
    if inside == "capture":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ran = len(tuner["ran"])
    assert autotune.pick("fwd", (1,), ["a", "b"], run, CUDA) == "b"  # the cached choice, nothing timed
    assert len(tuner["ran"]) == ran
