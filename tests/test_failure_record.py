"""A failed run's record names the stage it stopped in (requant.report.failure_record), from the
code that raised: a task's file, the stage's package, or an error that names its stage."""

from __future__ import annotations

import pytest

from requant.errors import SettingsError
from requant.report import failure_record


def raised_through(*files: str, error: BaseException | None = None) -> BaseException:
    """``error`` raised in a call chain whose frames are in ``files``, outermost first (code
    compiled under those names, as the installed package's frames are)."""
    error = error or RuntimeError("it broke")
    namespace: dict = {"error": error}
    names = []
    for i, file in enumerate(reversed(files)):
        name = f"f{i}"
        body = "raise error" if i == 0 else f"{names[-1]}()"
        exec(compile(f"def {name}():\n    {body}\n", file, "exec"), namespace)
        names.append(name)
    try:
        namespace[names[-1]]()
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


@pytest.mark.parametrize(("files", "stage"), [
    (["/w/flows/requantize.py", "/w/tasks/calibration.py", "/w/requant/calibration.py"],
     "calibration"),
    (["/w/flows/requantize.py", "/w/tasks/quantization.py",
      "/w/requant/quantization/checkpoint.py", "/site/llmcompressor/x.py"], "quantization"),
    (["/w/flows/requantize.py", "/w/tasks/quantization.py",
      "/w/requant/quantization/checkpoint.py", "/w/requant/quantization/verification.py"],
     "verification"),
    (["/w/flows/requantize.py", "/w/tasks/evaluation.py", "/w/requant/evaluation/staged.py",
      "/w/requant/serving/server.py"], "evaluation"),
    (["/w/flows/requantize.py", "/w/tasks/publish.py", "/w/requant/hub/publish.py",
      "/site/huggingface_hub/hf_api.py"], "publish"),
    (["/w/flows/requantize.py", "/w/tasks/rollout.py", "/w/requant/rollout/local.py",
      "/w/requant/serving/checks.py"], "rollout"),
    (["/site/requant/flows/requantize.py", "/site/requant/tasks/publish.py"], "publish"),
    (["/w/flows/requantize.py"], "flow"),
])
def test_the_record_names_the_stage_whose_code_raised(files, stage):
    record = failure_record(raised_through(*files))
    assert record["stage"] == stage
    assert record["error"] == "RuntimeError" and record["message"] == "it broke"


def test_an_error_that_names_its_stage_wins_over_where_it_was_raised():
    from types import SimpleNamespace

    from requant.errors import GateFailed

    refused = GateFailed(SimpleNamespace(status="fail", reasons=["recovery 0.91 < 0.957"]))
    record = failure_record(raised_through("/w/flows/requantize.py", error=refused))
    assert record["stage"] == "gate"
    settings = failure_record(raised_through("/w/flows/requantize.py", "/w/tasks/calibration.py",
                                             error=SettingsError("calibration.x: bad")))
    assert (settings["stage"], settings["error"]) == ("calibration", "SettingsError")
