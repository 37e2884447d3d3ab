"""examples/demo.py without a federation: the closing report's figures and a bad option."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # examples/ runs from the checkout

from examples.demo import TASKS, main, summary_lines  # noqa: E402


def test_report_gives_mean_std_ci_and_gain_per_metric():
    pre = {"auroc": 0.75, "accuracy": 0.7, "std": {"auroc": 0.02, "accuracy": 0.01},
           "ci95": {"auroc": [0.70, 0.80]}, "n_test": 320, "n_train": 96,
           "config": {"protocol": {"seeds": [0, 1, 2]}}}
    rnd = {"auroc": 0.6, "accuracy": 0.65, "std": {"auroc": 0.05, "accuracy": 0.03}, "ci95": {"auroc": [0.55, 0.66]}}
    lines = summary_lines({**pre, "random_init": rnd}, TASKS["medical"])
    assert lines[0].startswith("task: lung lesion present or absent in a chest CT slice (synthetic data), "
                               "320 test images, 96 labelled training images; mean ± std over 3 fine-tuning seed(s)")
    assert lines[1].split() == ["auroc", "pretrained", "0.750", "±", "0.020", "[0.700,", "0.800]", "random", "init",
                                "0.600", "±", "0.050", "[0.550,", "0.660]", "gain", "+0.150"]
    assert lines[2].split()[-1] == "+0.050" and "[" not in lines[2]  # no CI computed: none shown
    assert len(lines) == 3  # sensitivity/specificity absent from both: no row


def test_bad_run_config_is_one_line_exit_2_before_any_work(tmp_path, capsys):
    assert main(["--run-config", "momentum", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m examples.demo: error: --run-config: expected key=value pairs separated by spaces, got 'momentum'"]
    assert not (tmp_path / "out").exists()


def test_a_bad_run_config_value_is_one_line_exit_2_before_any_work(tmp_path, capsys):
    # checked by the server's own validation before any archive is generated, not mid-simulation
    out = tmp_path / "out"
    assert main(["--run-config", 'key-release="prototypes" prototype-first-share=0.5', "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m examples.demo: error: run_config prototype-first-share must be in [1, 100] (1 = every "
                   "release alike), got 0.5"]
    assert not out.exists()
    # more sites awaited than simulated: every round waited until the 600 s timeout (found by an audit)
    assert main(["--domain", "satellite", "--quick", "--sites", "1", "--run-config", "min-nodes=2",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m examples.demo: error: run_config min-nodes 2 is more than the 1 simulated site(s) (--sites)"]
    assert not out.exists()


def test_data_only_prints_the_run_config_with_the_overrides(tmp_path, capsys, monkeypatch):
    import examples.demo as demo

    monkeypatch.setattr(demo, "make_example_data", lambda domain, root, sites, quick: (root, root / "labelled"))
    assert main(["--domain", "satellite", "--quick", "--data-only", "--run-config", "local-epochs=5 momentum=0.9",
                 "--out", str(tmp_path / "out")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("run config: "))
    assert "local-epochs=5" in line and "momentum=0.9" in line and "local-epochs=3" not in line


def test_report_gives_the_paired_gain_interval_and_says_whether_it_clears_zero():
    pre = {"auroc": 0.75, "std": {"auroc": 0.02}, "ci95": {"auroc": [0.70, 0.80]}, "n_test": 320, "n_train": 96,
           "gain": {"auroc": 0.15, "ci95": {"auroc": [0.05, 0.24]},
                    "per_seed": {"0": {"auroc": 0.2}, "1": {"auroc": -0.01}, "2": {"auroc": 0.26}}}}
    rnd = {"auroc": 0.6, "std": {"auroc": 0.05}, "ci95": {"auroc": [0.55, 0.66]}}
    lines = summary_lines({**pre, "random_init": rnd}, TASKS["medical"])
    assert lines[1].split()[-3:] == ["+0.150", "[+0.050,", "+0.240]"]
    assert lines[-1].endswith("the AUROC gain is above zero, and higher in 2 of 3 fine-tuning seeds")
    pre["gain"]["ci95"]["auroc"] = [-0.01, 0.24]
    assert summary_lines({**pre, "random_init": rnd}, TASKS["medical"])[-1].endswith(
        "is not clear of zero, and higher in 2 of 3 fine-tuning seeds")


def test_counts_are_checked_before_any_work_and_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    import examples.demo as demo

    out = tmp_path / "out"
    assert main(["--epochs", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["python -m examples.demo: error: --epochs must be >= 1, got 0"]
    assert main(["--quick", "--rounds", "0", "--out", str(out)]) == 2  # an explicit count wins over --quick's
    assert not out.exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "make_example_data", interrupted)
    assert main(["--quick", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m examples.demo: interrupted;") and "Traceback" not in "\n".join(err)
