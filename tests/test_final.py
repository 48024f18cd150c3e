"""evaluate_final's one line: latency judged as predicted and as measured, AP against the base."""
import pytest

from jdnas.evaluation.final import final_line


def summary(meets: bool, measured_meets: bool, ap: float, meets_ap: bool) -> dict:
    return {"base": {"AP": 75.0},
            "final": {"AP": ap, "ap_delta_vs_base": ap - 75.0, "meets_ap": meets_ap, "latency_ratio": 0.665,
                      "predicted_latency_ratio": 0.597, "ratio_error": -0.102, "latency_target": 0.6,
                      "meets_target": meets, "measured_meets_target": measured_meets}}


@pytest.mark.parametrize("meets, measured, words", [
    (True, True, "meets the 0.6x target (predicted and measured)"),
    (True, False, "meets the 0.6x target as predicted, NOT AS MEASURED"),
    (False, False, "MISSES THE 0.6x TARGET;"),
    (False, True, "MISSES THE 0.6x TARGET as predicted (measured: meets it)"),
])
def test_the_line_says_how_the_target_was_judged(meets, measured, words):
    line = final_line(summary(meets, measured, 76.0, True))
    assert words in line and "\n" not in line
    assert "0.665x the base's measured, 0.597x predicted (table error -10.2%)" in line


def test_a_student_below_the_base_is_named_so():
    assert "AP 70.00 vs the base's 75.00 (-5.00): LESS ACCURATE THAN THE BASE" in final_line(
        summary(True, True, 70.0, False))
    assert "keeps the base's accuracy" in final_line(summary(True, True, 76.0, True))
