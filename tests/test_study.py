"""The evidence study (python -m pyevo.study): its plan, genomes, statistics, and the miniature end to end."""
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pyevo.study.plan import FULL, MINI, Arm, build_plan, study_settings, unit_keys
from pyevo.study.quality import summarise
from pyevo.study.report import (TrainingSeedSpread, _ablation_lines, _build_lines, _equal_latency_lines, _verdict_lines,
                                 balanced_shortfall, collect, finished_units, over_training_seeds, read_curve,
                                 same_students, verdict, with_training_noise)
from pyevo.study.__main__ import main as study_main
from pyevo.study.units import PIPELINE_DEFAULTS, StudyContext, changed_pipeline_defaults, pipeline_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_every_arm_the_issue_names_is_planned_and_units_come_after_what_they_need():
    units, arms = build_plan(FULL)
    names = [u.name for u in units]
    assert len(names) == len(set(names))
    for index, unit in enumerate(units):
        assert all(names.index(dep) < index for dep in unit.deps), unit.name
    families = {(a.family, a.target) for a in arms}
    for t in FULL.targets:
        for family in ("pyevo", "uniform", "diff-pruning", "random"):
            assert (family, t) in families
        assert sum(a.family == "random" and a.target == t for a in arms) == FULL.random_per_target
    assert {a.name for a in arms} >= {"pyevo-diffnas-nocap", "bk-sdm", "ablation-global-50", "ablation-loss-static-50",
                                      "ablation-loss-hard-50", "ablation-loss-end-only-50", "ablation-end-teacher-50",
                                      "ablation-teacher-path-50", "pyevo-budget-50"}
    for family in ("pyevo", "uniform", "diff-pruning"):  # three training seeds at the main target
        assert sorted(a.training_seed for a in arms if a.family == family and a.target == 0.5
                      and not a.name.startswith("pyevo-budget")) == [0, 1, 2]
    for arm in arms:  # every arm is evaluated (in its own unit) and timed
        assert "evaluate" in {u.name: u for u in units}[arm.name].spec and f"latency-{arm.name}" in names
    by_name = {u.name: u for u in units}
    assert by_name["ablation-teacher-path-50"].deps == ("base-teacher-path",)
    assert all(u.alone for u in units if u.kind == "base") and {u.phase for u in units if u.kind == "latency"} == {2}
    assert names.index("base-s1") > names.index("pyevo-diffnas-50")  # the main comparisons come first


def test_unit_keys_change_with_what_a_unit_depends_on_and_nothing_else():
    units, _ = build_plan(FULL)
    keys = unit_keys(units)
    more_samples, _ = build_plan(replace(FULL, num_samples=500))
    changed = unit_keys(more_samples)
    differ = {name for name in keys if keys[name] != changed[name]}
    assert differ == {u.name for u in units if u.kind != "base"}  # the bases' distillation and search stay
    other_steps, _ = build_plan(replace(FULL, pipeline={"retrain.steps": 10}))
    changed = unit_keys(other_steps)
    assert {name for name in keys if keys[name] == changed[name]} == {"teacher"}  # everything trained changes


def test_the_committed_digits_results_are_keyed_as_the_plan_keys_them_now():
    """A change to the plan that moves the digits study's keys would silently send its 89 finished units to run
    again (or, worse, pass changed settings off as the ones measured): every committed result must still match."""
    units, _ = build_plan(FULL)
    keys = unit_keys(units)
    stored = sorted((ROOT / "experiments" / "results" / "units").glob("*.json"))
    assert len(stored) == len(units)
    for path in stored:
        assert json.loads(path.read_text())["key"] == keys[path.stem], path.stem


@pytest.mark.parametrize("teacher, state", [("digits", "results"), ("latent-digits", "results-latent-digits")])
def test_the_committed_studies_ran_under_todays_pipeline_defaults(teacher, state):
    """Unit keys hold the study's own settings, not the pipeline's defaults: a changed default would leave the
    committed results standing for settings the study no longer runs. Keep the default, or run the study anew."""
    recorded = json.loads((ROOT / "experiments" / state / PIPELINE_DEFAULTS).read_text())
    assert recorded == pipeline_defaults(teacher)


def test_a_study_records_its_pipeline_defaults_and_refuses_to_go_on_under_others(tmp_path, capsys):
    units, _ = build_plan(MINI)
    state = tmp_path / "state"
    context = StudyContext(tmp_path / "out", state, MINI, {u.name: u for u in units}, unit_keys(units))
    assert changed_pipeline_defaults(context) == []  # first use: recorded
    recorded = json.loads((state / PIPELINE_DEFAULTS).read_text())
    assert recorded == pipeline_defaults(MINI.teacher) and recorded["search.cap_latency_slack"] == 1.2
    assert changed_pipeline_defaults(context) == []
    recorded["search.cap_latency_slack"] = 1.0  # as if the units had run under another default
    (state / PIPELINE_DEFAULTS).write_text(json.dumps(recorded))
    assert changed_pipeline_defaults(context) == ["search.cap_latency_slack: 1.0 -> 1.2"]
    argv = ["--mini", "--state", str(state), "--out", str(tmp_path / "out"), "--results", str(tmp_path / "R.md")]
    assert study_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "search.cap_latency_slack: 1.0 -> 1.2" in err and "another --state" in err
    assert sorted(p.name for p in state.iterdir()) == [PIPELINE_DEFAULTS] and not (tmp_path / "out").exists()
    (state / PIPELINE_DEFAULTS).write_text("[1, 2]")
    assert changed_pipeline_defaults(context) == [f"{PIPELINE_DEFAULTS} is not a JSON object of settings"]


def test_the_latent_study_plans_the_same_arms_keyed_apart_with_the_end_target_its_runs_do_not_use():
    digits_units, digits_arms = build_plan(FULL)
    latent_units, latent_arms = build_plan(study_settings("latent-digits"))
    digits_keys, latent_keys = unit_keys(digits_units), unit_keys(latent_units)
    assert len(latent_units) == len(digits_units) and len(latent_arms) == len(digits_arms)
    # The latent-digits runs retrain towards the teacher's prediction (its preset), so the ablation is the noise.
    names = {a.name for a in latent_arms}
    assert "ablation-end-noise-50" in names and "ablation-end-teacher-50" not in names
    ablation = {u.name: u for u in latent_units}["ablation-end-noise-50"]
    assert ablation.spec["overrides"]["retrain.end_target"] == "true"
    assert not set(digits_keys.values()) & set(latent_keys.values())  # no unit of one stands for the other's
    with pytest.raises(ValueError, match="built-in teachers"):
        study_settings("cifar10")


def test_a_result_is_credited_to_the_last_commit_that_changed_the_code():
    from pyevo.study.provenance import CODE_PATHS, code_commit

    def git(*args):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    code = git("log", "-1", "--format=%h", "--abbrev=12", "--", "pyevo/study/provenance.py")
    if not code:
        pytest.skip("not a git checkout with history")
    assert code_commit(code) == code and code_commit(code + "+changes") == code + "+changes"
    # A later commit of results alone is credited to the code commit before it.
    later = git("log", "--format=%h", "--abbrev=12", f"{code}..HEAD")
    for commit in (later.split() if later else []):
        if not git("diff", "--name-only", f"{commit}~1", commit, "--", *CODE_PATHS):
            assert code_commit(commit) == git("log", "-1", "--format=%h", "--abbrev=12", commit, "--", *CODE_PATHS)
            assert code_commit(commit) != commit
            break


def test_a_finished_unit_runs_again_only_where_its_work_is_gone_and_a_unit_to_run_needs_it(tmp_path):
    from pyevo.study.__main__ import units_to_run

    units, _ = build_plan(FULL)
    keys = unit_keys(units)
    context = StudyContext(tmp_path / "out", tmp_path / "state", FULL, {u.name: u for u in units}, keys)
    (tmp_path / "state" / "units").mkdir(parents=True)
    for name, key in keys.items():
        (tmp_path / "state" / "units" / f"{name}.json").write_text(json.dumps({"key": key, "result": {}}))
    # A finished study in a fresh clone (no work folder, so no base's search): nothing to run.
    assert units_to_run(context, units) == ([], set(keys))
    (tmp_path / "state" / "units" / "pyevo-diffnas-50.json").unlink()
    run, done = units_to_run(context, units)
    assert [u.name for u in run] == ["base-s0", "pyevo-diffnas-50"]  # its base's search is gone: made again
    assert "base-s1" in done and "base-s0" not in done and "latency-pyevo-diffnas-50" in done
    base = context.folder("base-s0")
    base.mkdir(parents=True)
    for name in ("supernet.safetensors", "search.json", "select.json"):
        (base / name).write_text("x")
    assert [u.name for u in units_to_run(context, units)[0]] == ["pyevo-diffnas-50"]
    # Selected alone, with its base's work gone: the base is not done, so the arm waits on it (and says so).
    base.joinpath("search.json").unlink()
    run, done = units_to_run(context, [context.units["pyevo-diffnas-50"]])
    assert [u.name for u in run] == ["pyevo-diffnas-50"] and "base-s0" not in done


def test_a_runner_reads_a_dependency_only_under_its_current_key(tmp_path):
    units, _ = build_plan(FULL)
    keys = unit_keys(units)
    context = StudyContext(tmp_path, tmp_path / "state", FULL, {u.name: u for u in units}, keys)
    record = context.result_path("base-s0")
    record.parent.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="'base-s0' has no result"):
        context.result("base-s0")
    record.write_text(json.dumps({"key": "another setting", "seconds": 1.0, "result": {"search_sha256": "a"}}))
    with pytest.raises(RuntimeError, match="'base-s0' has no result"):
        context.result("base-s0")
    record.write_text(json.dumps({"key": keys["base-s0"], "seconds": 1.0, "result": {"search_sha256": "a"}}))
    assert context.result("base-s0") == {"search_sha256": "a"}


def test_the_page_names_each_build_of_the_base_its_arms_came_from(tmp_path):
    units, _ = build_plan(FULL)
    keys = unit_keys(units)
    context = StudyContext(tmp_path, tmp_path / "state", FULL, {u.name: u for u in units}, keys)
    (tmp_path / "state" / "units").mkdir(parents=True)

    def finish(name, digest):
        result = {"base_search_sha256": digest} if digest else {}
        (tmp_path / "state" / "units" / f"{name}.json").write_text(
            json.dumps({"key": keys[name], "seconds": 1.0, "result": result}))

    finish("pyevo-diffnas-50", "a" * 64)
    finish("uniform-50", None)  # a pruned arm needs no base
    assert _build_lines(finished_units(context)) == []  # one build: nothing to say
    finish("bk-sdm", "b" * 64)
    finish("random-50-0", "a" * 64)
    (line,) = _build_lines(finished_units(context))
    assert "2 builds" in line and "`aaaaaaaa` (pyevo-diffnas-50, random-50-0)" in line and "`bbbbbbbb` (bk-sdm)" in line
    assert "uniform-50" not in line


def test_bk_sdm_is_compared_with_the_pyevo_student_nearest_it_in_macs(tmp_path):
    units, arms = build_plan(FULL)
    keys = unit_keys(units)
    context = StudyContext(tmp_path, tmp_path / "state", FULL, {u.name: u for u in units}, keys)
    (tmp_path / "state" / "units").mkdir(parents=True)

    def finish(name, macs, balanced_fd):
        per_seed = {str(seed): {"fd": balanced_fd + seed * 0.01, "balanced_fd": balanced_fd + seed * 0.01}
                    for seed in (0, 1, 2)}
        (tmp_path / "state" / "units" / f"{name}.json").write_text(json.dumps(
            {"key": keys[name], "seconds": 1.0, "result": {"macs_ratio": macs, "per_seed": per_seed}}))

    finish("pyevo-diffnas-50", 0.50, 5.0)  # better than BK-SDM, but far from it in MACs
    finish("pyevo-diffnas-70", 0.65, 9.0)
    finish("bk-sdm", 0.665, 6.0)
    _, rows = collect(finished_units(context), arms)
    (line,) = [line for line in _verdict_lines(context, rows, None) if line.startswith("- BK-SDM")]
    assert "against pyevo at 70% (MACs 0.650, the nearest): pyevo worse; worse" in line


def test_pyevo_curve_is_read_linearly_in_macs_between_its_students():
    low = {"fd": {"mean": 10.0, "std": 1.0, "ratio": 1.0}, "psnr": {"mean": 20.0, "std": 0.0, "ratio": None}}
    high = {"fd": {"mean": 6.0, "std": 3.0, "ratio": 0.6}, "psnr": {"mean": 30.0, "std": 1.0, "ratio": None}}
    curve = [(0.4, low), (0.6, high)]
    middle = read_curve(curve, 0.45)
    assert middle["fd"] == pytest.approx({"mean": 9.0, "std": 1.5, "ratio": 0.9})
    assert middle["psnr"]["ratio"] is None and middle["psnr"]["mean"] == pytest.approx(22.5)
    assert read_curve(curve, 0.6)["fd"]["mean"] == pytest.approx(6.0)
    assert read_curve(curve, 0.39) is None and read_curve(curve, 0.61) is None and read_curve(curve[:1], 0.4) is None


def _made_row(name, family, target, seed, genome, per_seed, macs=0.5, search="s0"):
    summary = summarise(per_seed, None)
    return {"arm": Arm(name, family, name, target, seed), "summary": summary, "latency": None,
            "made": {"genome": genome, "base_search_sha256": search, "per_seed": per_seed, "macs_ratio": macs}}


def test_one_student_is_named_once_where_arms_share_its_genome_search_and_figures():
    figures = {"0": {"fd": 2.0}, "1": {"fd": 3.0}}
    rows = {"pyevo-diffnas-70": _made_row("pyevo-diffnas-70", "pyevo", 0.7, 0, "g", figures),
            "pyevo-diffnas-nocap": _made_row("pyevo-diffnas-nocap", "pyevo", None, 0, "g", figures),
            # the same genome retrained otherwise (an ablation), or from another search: other students
            "ablation": _made_row("ablation", "ablation", 0.7, 0, "g", {"0": {"fd": 2.0}, "1": {"fd": 3.5}}),
            "other-search": _made_row("other-search", "pyevo", 0.7, 1, "g", figures, search="s1")}
    assert same_students(rows) == [["pyevo-diffnas-70", "pyevo-diffnas-nocap"]]


def test_families_over_training_seeds_are_the_mean_and_spread_of_their_seeds_means():
    rows = {f"pyevo-diffnas-50{suffix}": _made_row(f"pyevo-diffnas-50{suffix}", "pyevo", 0.5, seed, suffix,
                                                   {"0": {"fd": fd - 1}, "1": {"fd": fd + 1}}, macs=macs)
            for suffix, seed, fd, macs in (("", 0, 10.0, 0.49), ("-s1", 1, 6.0, 0.50), ("-s2", 2, 8.0, 0.51))}
    rows["pyevo-budget-50"] = _made_row("pyevo-budget-50", "pyevo", 0.5, 0, "b", {"0": {"fd": 50.0}})  # not diffnas
    pooled = over_training_seeds(rows, "pyevo", 0.5)
    assert pooled.summary["fd"] == pytest.approx({"mean": 8.0, "std": 2.0}) and pooled.macs == pytest.approx(0.5)
    assert pooled.seeds == 3
    del rows["pyevo-diffnas-50-s1"], rows["pyevo-diffnas-50-s2"]
    assert over_training_seeds(rows, "pyevo", 0.5) is None  # one seed has no spread


def test_each_arm_meets_the_best_pyevo_student_no_slower_than_it():
    def timed(name, family, target, fd, latency):
        row = _made_row(name, family, target, 0, name, {"0": {"fd": fd, "balanced_fd": fd}, "1": {"fd": fd + 1,
                                                                                                  "balanced_fd": fd + 1}})
        row["latency"] = {"ratio": latency}
        return row

    rows = {"pyevo-diffnas-30": timed("pyevo-diffnas-30", "pyevo", 0.3, 20.0, 0.50),
            "pyevo-diffnas-50": timed("pyevo-diffnas-50", "pyevo", 0.5, 9.0, 0.57),
            "pyevo-diffnas-70": timed("pyevo-diffnas-70", "pyevo", 0.7, 6.0, 0.55),
            "uniform-50": timed("uniform-50", "uniform", 0.5, 3.0, 0.80),
            "uniform-30": timed("uniform-30", "uniform", 0.3, 12.0, 0.56),
            "diff-pruning-30": timed("diff-pruning-30", "diff-pruning", 0.3, 12.0, 0.45)}
    table = {line.split(" | ")[0].lstrip("| "): line for line in _equal_latency_lines(rows) if line.startswith("| ")}
    assert "70%, 0.550 (of 2)" in table["uniform-30"] and "better" in table["uniform-30"]  # 0.57 is slower: left out
    assert "70%, 0.550 (of 3)" in table["uniform-50"] and "worse" in table["uniform-50"]
    assert "none as fast" in table["diff-pruning-30"]
    # One student timed twice (the caps-off arm is the 70% one) stands at the mean of its two timings.
    rows["pyevo-diffnas-nocap"] = timed("pyevo-diffnas-nocap", "pyevo", None, 6.0, 0.59)
    rows["pyevo-diffnas-nocap"]["made"]["genome"] = "pyevo-diffnas-70"
    rows["uniform-57"] = timed("uniform-57", "uniform", 0.5, 3.0, 0.565)
    table = {line.split(" | ")[0].lstrip("| "): line for line in _equal_latency_lines(rows) if line.startswith("| ")}
    assert "70%, 0.570 (of 3)" in table["uniform-50"]
    assert "30%, 0.500 (of 1)" in table["uniform-57"]  # 0.570 is slower than 0.565, whichever timing came first


def test_ablations_are_judged_with_and_without_the_training_seeds_spread_and_other_builds_are_named(tmp_path):
    units, arms = build_plan(FULL)
    keys = unit_keys(units)
    context = StudyContext(tmp_path, tmp_path / "state", FULL, {u.name: u for u in units}, keys)
    (tmp_path / "state" / "units").mkdir(parents=True)

    def finish(name, balanced_fd, search="a" * 64):
        per_seed = {str(seed): {"fd": balanced_fd + seed * 0.1, "balanced_fd": balanced_fd + seed * 0.1,
                                "class_shares": [0.1] * 9 + [0.0 + 0.1 * (name != "uniform-50")]}
                    for seed in (0, 1, 2)}
        (tmp_path / "state" / "units" / f"{name}.json").write_text(json.dumps(
            {"key": keys[name], "seconds": 1.0,
             "result": {"macs_ratio": 0.5, "per_seed": per_seed, "base_search_sha256": search, "genome": name}}))

    finish("pyevo-diffnas-50", 5.0)
    finish("ablation-loss-end-only-50", 6.0)  # 1.0 worse: beyond evaluation noise (0.14), within 2 x 0.8 spread
    finish("ablation-loss-static-50", 9.0, search="b" * 64)  # beyond both; from another build
    finish("ablation-loss-hard-50", 6.0)
    _, rows = collect(finished_units(context), arms)
    table = {line.split(" | ")[0].lstrip("| "): line for line in _ablation_lines(context, rows, None)
             if line.startswith("| ")}
    assert table["retrain loss end-only"].endswith("| worse | worse | pending | pending |")  # no spread yet
    finish("pyevo-diffnas-50-s1", 6.0, search="c" * 64)
    finish("pyevo-diffnas-50-s2", 4.4, search="d" * 64)  # seeds' means 5.1, 6.1, 4.5: std 0.81
    _, rows = collect(finished_units(context), arms)
    spread = over_training_seeds(rows, "pyevo", 0.5)
    lines = _ablation_lines(context, rows, spread)
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    assert table["retrain loss end-only"].endswith("| worse | worse | within noise | within noise |")
    assert table["retrain loss static"].endswith("| worse | worse | worse | worse |")
    (note,) = [line for line in lines if line.startswith("- From another build")]
    assert "`aaaaaaaa`" in note and note.endswith(": retrain loss static.")
    claims = [line for line in _verdict_lines(context, rows, spread) if line.startswith("- *")]
    assert "dynamic is better (counting training-seed noise: within noise) on class-balanced FD" in claims[0]
    assert "against static better (counting training-seed noise: better)" in claims[1]
    # uniform-50 has no 10th class: its three sets fall short of 70 (one of them, 0 of the class)
    finish("uniform-50", 5.0)
    assert balanced_shortfall(finished_units(context), FULL.num_samples) == (3, 21, 0)


def test_summaries_are_means_and_stds_over_seeds_and_ratios_of_the_means():
    model = {"0": {"fd": 2.0, "psnr": 20.0}, "1": {"fd": 4.0, "psnr": 22.0}}
    teacher = {"0": {"fd": 1.0}, "1": {"fd": 5.0}}
    summary = summarise(model, teacher)
    assert summary["fd"]["mean"] == 3.0 and summary["fd"]["std"] == pytest.approx(math.sqrt(2))
    assert summary["fd"]["ratio"] == pytest.approx(3.0 / 3.0)  # not the mean of the per-seed ratios (1.2)
    assert summary["psnr"]["ratio"] is None  # a paired figure has no teacher value
    noisy_kid = summarise({"0": {"kid": -20.0}, "1": {"kid": 15.0}}, {"0": {"kid": 8.0}, "1": {"kid": 9.0}})
    assert noisy_kid["kid"]["mean"] == -2.5 and noisy_kid["kid"]["ratio"] is None  # noise around zero: no ratio
    clear_kid = summarise({"0": {"kid": 16.0}, "1": {"kid": 18.0}}, {"0": {"kid": 8.0}, "1": {"kid": 9.0}})
    assert clear_kid["kid"]["ratio"] == pytest.approx(2.0)
    a = {"fd": {"mean": 1.0, "std": 0.3}}
    assert verdict(a, {"fd": {"mean": 2.0, "std": 0.4}}, "fd") == "better"  # 1.0 apart > 0.5 combined
    assert verdict(a, {"fd": {"mean": 1.4, "std": 0.4}}, "fd") == "within noise"
    # PSNR: higher is better
    assert verdict({"psnr": {"mean": 20, "std": 0}}, {"psnr": {"mean": 25, "std": 1}}, "psnr") == "worse"
    assert verdict(a, None, "fd") == "pending"
    # Counting a training-seed spread of 0.7 for each: sqrt(0.3² + 0.4² + 2 x 0.7²) = 1.11 > 1.0 apart.
    spread = TrainingSeedSpread({"fd": {"mean": 5.0, "std": 0.7}}, macs=0.5, seeds=3)
    assert verdict(with_training_noise(a, spread), with_training_noise({"fd": {"mean": 2.0, "std": 0.4}}, spread),
                   "fd") == "within noise"
    assert with_training_noise(a, None) is None


def test_bk_sdm_removal_skips_each_blocks_second_resnet_and_attention_and_the_mid_block():
    from pyevo.space import decode_network, unet_space
    from pyevo.study.units import arm_genome
    from pyevo.teacher import load_teacher

    teacher, _ = load_teacher("digits")
    spaces = unet_space(teacher)
    genome, _ = arm_genome({"bk-sdm": True}, "digits")
    decoded = decode_network(genome, spaces)
    for space in spaces:
        arch = space.arch(decoded[space.name])
        teacher_arch = space.arch(space.teacher_genome())
        for layers, original, removed_flag in ((arch.resnets, teacher_arch.resnets, "skip"),
                                               (arch.attentions, teacher_arch.attentions, "dropped")):
            assert layers.keys() == original.keys()
            for index, layer in layers.items():
                removed = space.name == "mid_block" or index == 1
                assert (getattr(layer, removed_flag) if removed else layer == original[index]), (space.name, index)


def test_random_genomes_land_under_their_target_and_are_drawn_alike_each_time():
    """The arm's genome, assembled as a student, has MACs within the window under the target (counted on
    the whole network, not summed from the blocks as the draw does), and the same arm draws the same one."""
    from pyevo.pipeline import network_cost
    from pyevo.space import decode_network, unet_space
    from pyevo.student import StudentUNet2DModel
    from pyevo.study.units import RANDOM_WINDOW, arm_genome
    from pyevo.supernet import build_supernet
    from pyevo.teacher import load_teacher

    teacher, _ = load_teacher("digits")
    spec = {"random": {"target": 0.5, "index": 1}}
    genome, draws = arm_genome(spec, "digits", pool=24)  # small pools: each genome's MACs are counted once
    assert arm_genome(spec, "digits", pool=24) == (genome, draws)
    student = StudentUNet2DModel.from_supernet(teacher, build_supernet(teacher),
                                               decode_network(genome, unet_space(teacher)))
    ratio = network_cost(student).macs / network_cost(teacher).macs
    assert 0.5 - RANDOM_WINDOW <= ratio <= 0.5 + 1e-9


@pytest.mark.parametrize("teacher", ["digits", "latent-digits"])
def test_the_miniature_study_runs_writes_its_page_and_resumes_with_nothing_to_do(tmp_path, teacher):
    """The CI miniature: ``python -m pyevo.study --mini`` from nothing (every kind of unit: a base, in-space
    arms, a pruned arm, the teacher, quality, latency), then again: every unit is read back. On the latent
    teacher every arm trains on latents and every figure is taken on decoded digits."""
    out, state, page = tmp_path / "mini", tmp_path / "state", tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "pyevo.study", "--mini", "--teacher", teacher, "--out", str(out),
               "--state", str(state), "--results", str(page)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    settings = study_settings(teacher, mini=True)
    units, arms = build_plan(settings)
    import safetensors.torch

    teacher_samples = next((out / "teacher-samples").glob("*/seed-0.safetensors"))
    size = {"digits": 16, "latent-digits": 32}[teacher]  # the pixel teacher's digits; the latents' decoded ones
    assert safetensors.torch.load_file(teacher_samples)["samples"].shape == (settings.num_samples, 1, size, size)
    keys = unit_keys(units)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    for unit in units:
        stored = json.loads((state / "units" / f"{unit.name}.json").read_text())
        assert stored["key"] == keys[unit.name]
        if head.returncode == 0:  # a git checkout: each result names the commit its code ran at
            assert stored["code"].split("+")[0] == head.stdout.strip()
    text = page.read_text()
    table = text.split("## Every arm")[1].split("\n## ")[0]
    assert "pending" not in table  # every arm's row filled (the verdicts name arms the miniature leaves out)
    for arm in arms:
        assert arm.label in table
    uniform = json.loads((state / "units" / "uniform-50.json").read_text())["result"]
    assert 0.3 < uniform["macs_ratio"] < 0.7
    assert (tmp_path / "results_plots" / "quality_vs_macs.png").stat().st_size > 0
    assert (state / "bases" / "base-s0" / "timings.json").is_file()  # what another sitting's base starts from
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"0 of {len(units)} units to run" in again.stderr
    # Another sitting (a fresh clone): the work folder is gone, the committed results are there.
    shutil.rmtree(out)
    fresh = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and f"0 of {len(units)} units to run" in fresh.stderr
