"""The exercise notebooks and their grader: every solution passes, every stub fails every exercise, and a typical
wrong answer to each exercise fails with the hint that names its mistake.

Most tests grade in-process (``grading.run_in_process``: the notebook's cells exec'd in one namespace, torch
imported once); two go through a real kernel (nbclient) and the CLI, as a student's ``minidpo grade`` does.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import nbformat
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from minidpo import cli, grading

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "exercises"
STUBS = sorted(EXERCISES.glob("0*.ipynb"))
SOLUTIONS = sorted((EXERCISES / "solutions").glob("0*.ipynb"))


def _tags(path: Path) -> list[int]:
    return sorted(grading.exercise_cells(nbformat.read(path, as_version=4)))


# ---------------------------------------------------------------------------------------------------------------
# The course's exercise set


def test_one_exercise_notebook_per_course_notebook_and_sixteen_exercises():
    assert [p.name[:2] for p in STUBS] == ["01", "02", "03", "04", "05", "06", "07"]
    assert [p.name for p in SOLUTIONS] == [p.name for p in STUBS]
    numbers = [n for p in STUBS for n in _tags(p)]
    assert numbers == list(range(1, 17)) == sorted(grading.EXERCISES)
    for stub, solution in zip(STUBS, SOLUTIONS):
        assert _tags(stub) == _tags(solution)
        for n in _tags(stub):  # each exercise is graded with the notebook it belongs to
            assert grading.EXERCISES[n].notebook == stub.name[:2]
    assert sum(bool(e.confusion) for e in grading.EXERCISES.values()) >= 4


def test_notebooks_are_what_build_py_writes():
    """The committed notebooks are exactly exercises/build.py's output: statements, stubs and solutions in step."""
    spec = importlib.util.spec_from_file_location("exercise_build", EXERCISES / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for name, cells in build.NOTEBOOKS.items():
        for solution, path in ((False, EXERCISES / f"{name}.ipynb"), (True, EXERCISES / "solutions" / f"{name}.ipynb")):
            want = [(c.cell_type, c.source, c.metadata.get("tags")) for c in build.build(cells, solution).cells]
            got = [(c.cell_type, c.source, c.metadata.get("tags")) for c in nbformat.read(path, as_version=4).cells]
            assert got == want, f"{path} differs from exercises/build.py: rerun it"


def test_grader_is_independent_of_the_functions_students_reimplement():
    """grading.py computes its references itself: it imports no other minidpo module."""
    tree = ast.parse((ROOT / "minidpo" / "grading.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("minidpo"), ast.dump(node)
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("minidpo") for a in node.names)


def test_grader_references_match_golden_values_and_the_package():
    """The grader's own references (numpy) against stored golden numbers, and against minidpo's functions:
    two independent implementations of each formula, so the grader checks the package too."""
    import numpy as np

    import minidpo
    from minidpo import bandit, evaluate

    pc, pr, rc, rr = grading._fixed_logps()
    assert float(grading._dpo_ref(pc, pr, rc, rr, 0.1)[0].sum()) == pytest.approx(4.072788159919561, abs=1e-12)
    for beta in (0.1, 2.0):
        want = grading._dpo_ref(pc, pr, rc, rr, beta)
        got = minidpo.preference_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta)
        assert all(np.allclose(a.numpy(), b) for a, b in zip(got, want))

    logits, _, labels = grading._fixed_sequences()
    golden = [-13.751940036216826, -12.18879077421998, -21.144473284803833]
    assert grading._seq_logps(logits, labels) == pytest.approx(golden, abs=1e-10)
    assert minidpo.sequence_logps(torch.tensor(logits), torch.tensor(labels)).numpy() == pytest.approx(golden, abs=1e-4)

    ref, r = grading._fixed_tables()
    star = grading._pi_star(ref, r, 0.5)
    assert star[0, 4] == pytest.approx(0.5348464986313687, abs=1e-12)
    assert np.allclose(minidpo.optimal_policy(torch.tensor(ref), torch.tensor(r), 0.5).numpy(), star)
    pi = np.random.default_rng(0).dirichlet(np.ones(5), size=3)
    assert float(bandit.rlhf_objective(torch.tensor(pi), torch.tensor(ref), torch.tensor(r), 0.7)) == \
        pytest.approx(grading._objective(pi, ref, r, 0.7), abs=1e-12)

    u = np.random.default_rng(14).normal(size=(5, 4)) * 3
    golden = [0.6172436560110242, 4.377617000096442, 7.85263591768026, 4.521218711700269, 4.2479447846118035]
    assert grading._plackett_luce(u, 0.5) == pytest.approx(golden, abs=1e-10)
    got = bandit.plackett_luce_loss(torch.tensor(u), torch.zeros(5, 4, dtype=torch.float64), 0.5)
    assert got.numpy() == pytest.approx(golden, abs=1e-10)

    ref5, tied = np.array([0.3, 0.1, 0.2, 0.25, 0.15]), np.array([0.0, 1.0, 1.0, 0.0, 2.0])
    assert grading._best_of_n_kl(ref5, tied, 4) == pytest.approx(0.5453407674316811, abs=1e-12)
    samples = [0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 3.0, 3.0]  # equal weights: the package's plug-in estimate
    for n in (1, 2, 5):
        (row,) = evaluate.best_of_n([samples], [n])
        assert row["kl"] == pytest.approx(grading._best_of_n_kl(np.full(8, 1 / 8), np.array(samples), n), abs=1e-12)


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_every_solution_passes(path):
    results = grading.run_in_process(path)
    assert results and all(r.passed for r in results), grading.format_table(results)


@pytest.mark.parametrize("path", STUBS, ids=lambda p: p.name)
def test_every_stub_fails_every_exercise(path):
    results = grading.run_in_process(path)
    assert [r.number for r in results] == _tags(path)
    for r in results:
        assert not r.passed and "stub" in r.message, r


# ---------------------------------------------------------------------------------------------------------------
# Typical wrong answers, one exercise at a time: the solution's namespace with one name replaced


def _solution_namespace(number: int) -> dict:
    """Exec the setup cell and the solution cell of one exercise, as the notebook would."""
    path = next(p for p in SOLUTIONS if p.name[:2] == grading.EXERCISES[number].notebook)
    nb = nbformat.read(path, as_version=4)
    cell = nb.cells[grading.exercise_cells(nb)[number]]
    ns: dict = {"__name__": "__main__"}
    exec("import math\nimport numpy as np\nimport sympy as sp\nimport torch\nimport torch.nn.functional as F\n"
         "import minidpo", ns)  # noqa: S102
    exec(cell.source, ns)  # noqa: S102
    return ns


def _grade(number: int, **replace) -> grading.Result:
    ns = _solution_namespace(number)
    ns.update(replace)
    (result,) = grading.grade_namespace(ns, [number])
    return result


@pytest.mark.parametrize("number", sorted(grading.EXERCISES))
def test_solution_cell_alone_passes(number):
    assert _grade(number).passed


def _pi_star_beta_times(ref, r, beta):
    return torch.softmax(torch.log(ref) + r * beta, -1)


def _pi_star_naive(ref, r, beta):
    w = ref * torch.exp(r / beta)
    return w / w.sum(-1, keepdim=True)


def _pi_star_no_ref(ref, r, beta):
    return torch.softmax(r / beta, -1)


def _step10_log_z_inside(pi, ref, r, beta):
    Z = sp.Add(*[q * sp.exp(ry / beta) for q, ry in zip(ref, r)])
    return sp.Add(*[p * (sp.log(p * Z / (q * sp.exp(ry / beta))) - sp.log(Z)) for p, q, ry in zip(pi, ref, r)])


def _step10_plus_log_z(pi, ref, r, beta):
    Z = sp.Add(*[q * sp.exp(ry / beta) for q, ry in zip(ref, r)])
    return sp.Add(*[p * sp.log(p * Z / (q * sp.exp(ry / beta))) for p, q, ry in zip(pi, ref, r)]) + sp.log(Z)


def _dpo(sign=1.0, beta_inside=True, detach=True, naive=False, reward_beta=True):
    def loss(pc, pr, rc, rr, beta):
        h = (pc - rc) - (pr - rr)
        z = beta * h if beta_inside else h
        logsig = torch.log(torch.sigmoid(z)) if naive else F.logsigmoid(z)
        losses = -sign * logsig if beta_inside else -beta * logsig
        cr, rj = (beta if reward_beta else 1.0) * (pc - rc), (beta if reward_beta else 1.0) * (pr - rr)
        return losses, (cr.detach() if detach else cr), (rj.detach() if detach else rj)
    return loss


def _seq_unshifted(logits, labels):
    mask = labels != -100
    tok = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def _seq_raw_logits(logits, labels):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    return (logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


def _seq_counts_masked(logits, labels):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).sum(-1)


def _example(eos=True, pad_label=False, prompt_label=False, check_length=True):
    def build(prompt, completion, eos_id, pad_id, length):
        ids = list(prompt) + list(completion) + ([eos_id] if eos else [])
        if check_length and len(ids) > length:
            raise ValueError("too long")
        labels = (list(prompt) if prompt_label else [-100] * len(prompt)) + list(completion) + ([eos_id] if eos else [])
        n = length - len(ids)
        return {"input_ids": ids + [pad_id] * n, "attention_mask": [1] * len(ids) + [0] * n,
                "labels": labels + [(pad_id if pad_label else -100)] * n}
    return build


def _step(zero_grad=True, step=True, sign=1.0, mask=True):
    def dpo_step(policy, optimizer, batch, ref_c, ref_r, beta):
        logps = {}
        for side in ("chosen", "rejected"):
            logits = policy(input_ids=batch[f"{side}_input_ids"]).logits[:, :-1]
            labels = batch[f"{side}_labels"][:, 1:] if mask else batch[f"{side}_input_ids"][:, 1:]
            tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            logps[side] = (tok * (labels != -100)).sum(-1)
        h = (logps["chosen"] - ref_c) - (logps["rejected"] - ref_r)
        loss = -F.logsigmoid(sign * beta * h).mean()
        if zero_grad:
            optimizer.zero_grad()
        loss.backward()
        if step:
            optimizer.step()
        return loss.item()
    return dpo_step


def _reference_with_grad(ref_model, batch):
    out = []
    for side in ("chosen", "rejected"):
        logits = ref_model(input_ids=batch[f"{side}_input_ids"]).logits
        out.append(_seq_unshifted(logits[:, :-1], batch[f"{side}_labels"][:, 1:]).detach())
    return tuple(out)


def _plackett_luce_all(u, beta):
    z = beta * u
    return -(z - torch.logsumexp(z, -1, keepdim=True))[:, :-1].sum(-1)


def _plackett_luce_reversed(u, beta):
    z = (beta * u).flip(-1)
    return -(z - torch.logcumsumexp(z.flip(-1), -1).flip(-1)).sum(-1)


def _bon_ignoring_ties(ref, r, n):
    order = torch.argsort(r + 1e-6 * torch.arange(len(r)))
    p = ref[order]
    cdf = p.cumsum(0)
    q = cdf ** n - torch.cat([cdf.new_zeros(1), cdf[:-1]]) ** n
    return (q * (q / p).log()).sum()


WRONG = [
    (1, dict(pi_star=_pi_star_beta_times), "LARGER beta must keep pi* CLOSER"),
    (1, dict(pi_star=_pi_star_naive), "log space"),
    (1, dict(pi_star=_pi_star_no_ref), "ignores pi_ref"),
    (1, dict(pi_star=lambda ref, r, b: torch.softmax(torch.log(ref) + r / b, 0)), "must sum to 1"),
    (2, dict(step10=_step10_log_z_inside), "still inside the expectation"),
    (2, dict(step10=_step10_plus_log_z), "sign of the log Z"),
    (2, dict(step10_given=[sp.Symbol("beta", positive=True) > 0]), "say nothing about pi"),
    (2, dict(step10_given=[sp.Eq(sp.Symbol("pi_2", positive=True), 1 - sp.Symbol("pi_0", positive=True))]),
     "still differs from step (4)"),
    (3, dict(objective_J=lambda pi, ref, r, b: ((pi * r).sum(-1) - b * (ref * (ref / pi).log()).sum(-1)).mean()),
     "KL(pi_ref || pi)"),
    (3, dict(objective_J=lambda pi, ref, r, b: ((pi * r).sum(-1) + b * (pi * (pi / ref).log()).sum(-1)).mean()),
     "is a cost"),
    (4, dict(reward_from_policy=lambda s, q, z, b: b * sp.log(s / q) - b * sp.log(z)), "+beta log Z"),
    (4, dict(bradley_terry=lambda r1, r2: sp.exp(r2) / (sp.exp(r1) + sp.exp(r2))), "WINS"),
    (5, dict(dpo_loss=_dpo(sign=-1.0)), "ln 2 ≈ 0.693: is the sign of the log-sigmoid right?"),
    (5, dict(dpo_loss=_dpo(beta_inside=False)), "beta belongs inside the sigmoid"),
    (5, dict(dpo_loss=_dpo(detach=False)), "carry gradient"),
    (5, dict(dpo_loss=_dpo(naive=True)), "logsigmoid"),
    (5, dict(dpo_loss=_dpo(reward_beta=False)), "miss beta"),
    (6, dict(implicit_reward_table=lambda pi, ref, b: b * (ref.log() - pi.log())), "upside down"),
    (6, dict(implicit_reward_table=lambda pi, ref, b: pi.log() - ref.log()), "misses the factor beta"),
    (7, dict(gradient_weight=lambda pc, pr, rc, rr, b: b * torch.sigmoid(b * (pc - rc) - b * (pr - rr))),
     "reward estimate is WRONG"),
    (7, dict(gradient_weight=lambda pc, pr, rc, rr, b: torch.sigmoid(b * (pr - rr) - b * (pc - rc))),
     "factor beta in front"),
    (8, dict(seq_logps=_seq_unshifted), "not shifted"),
    (8, dict(seq_logps=_seq_raw_logits), "log_softmax"),
    (8, dict(seq_logps=_seq_counts_masked), "-100"),
    (8, dict(seq_logps=lambda lg, lb: _seq_unshifted(lg[:, :-1], lb[:, 1:]) / (lb[:, 1:] != -100).sum(-1)),
     "SUM"),
    (9, dict(build_example=_example(eos=False)), "never scored on stopping"),
    (9, dict(build_example=_example(pad_label=True)), "pad id"),
    (9, dict(build_example=_example(prompt_label=True)), "prompt's tokens are counted"),
    (9, dict(build_example=_example(check_length=False)), "ValueError"),
    (10, dict(logprob_shifts=lambda pi, ref, x, w, l: ((ref.log() - pi.log())[x, w], (ref.log() - pi.log())[x, l])),
     "reversed"),
    (10, dict(sum_rule_rhs=lambda pi, ref: -(pi * (pi / ref).log()).sum(-1).mean()), "under pi_ref"),
    (10, dict(answer_10="a"), "`answer_10` = 'a' is not right"),
    (11, dict(dpo_step=_step(zero_grad=False)), "accumulate"),
    (11, dict(dpo_step=_step(step=False)), "did not change"),
    (11, dict(dpo_step=_step(sign=-1.0)), "went UP the loss"),
    (11, dict(dpo_step=_step(mask=False)), "-100 on prompt and padding"),
    (12, dict(reference_logps=_reference_with_grad), "bytes of activations"),
    (13, dict(frontier_point=lambda lp, lr, rw: (rw.mean(), (lr - lp).mean())), "opposite sign"),
    (13, dict(closest_beta=0.05), "smallest KL"),
    (13, dict(verdict_002="holds"), "`verdict_002` = 'holds' is not right"),
    (14, dict(plackett_luce_loss=_plackett_luce_all), "still left"),
    (14, dict(plackett_luce_loss=_plackett_luce_reversed), "wrong way"),
    (15, dict(ipo_loss=lambda pc, pr, rc, rr, b: (((pc - rc) - (pr - rr)) - b / 2) ** 2), "SMALLER beta"),
    (15, dict(cdpo_margin=lambda b, e: math.log((1 - e) / e) * b), "divides by beta"),
    (16, dict(best_of_n_kl=_bon_ignoring_ties), "tied rewards as distinct"),
    (16, dict(best_of_n_kl=lambda ref, r, n: torch.tensor(math.log(n) - (n - 1) / n)), "the formula"),
    (16, dict(best_of_n_kl=lambda ref, r, n: torch.tensor(grading._best_of_n_kl(ref.numpy(), r.numpy(), n)
                                                          + 0.1 * (n == 1))), "best-of-1"),  # wrong at n = 1 only
    (16, dict(formula_verdict="exact"), "`formula_verdict` = 'exact' is not right"),
]


@pytest.mark.parametrize("number, replace, hint", WRONG, ids=lambda v: v if isinstance(v, (int, str)) else None)
def test_typical_wrong_answer_fails_with_its_hint(number, replace, hint):
    result = _grade(number, **replace)
    assert not result.passed
    assert hint in result.message, result.message


def test_every_exercise_has_a_wrong_answer_test():
    assert {n for n, _, _ in WRONG} == set(grading.EXERCISES)


def test_missing_name_and_crashing_function_give_hints():
    ns = _solution_namespace(5)
    del ns["dpo_loss"]
    (r,) = grading.grade_namespace(ns, [5])
    assert not r.passed and "`dpo_loss` is not defined" in r.message
    (r,) = grading.grade_namespace({"dpo_loss": lambda *a: 1 / 0}, [5])
    assert not r.passed and "ZeroDivisionError" in r.message


# ---------------------------------------------------------------------------------------------------------------
# Through a kernel and the command line


def test_kernel_grading_survives_a_broken_cell(tmp_path):
    """A cell that raises does not stop the others (allow_errors): its exercise fails, the rest pass."""
    nb = nbformat.read(EXERCISES / "solutions" / "02_dpo_loss.ipynb", as_version=4)
    cells = grading.exercise_cells(nb)
    nb.cells[cells[4]].source = "undefined_name + 1\n" + nb.cells[cells[4]].source
    path = tmp_path / "02_broken.ipynb"
    nbformat.write(nb, path)
    results = {r.number: r for r in grading.grade_notebook(path)}
    assert not results[4].passed and "its cell raised NameError" in results[4].message
    assert results[5].passed and results[6].passed


def test_cli_grade_exit_codes(tmp_path, capsys):
    assert cli.main(["grade", str(EXERCISES / "07_claim_check.ipynb")]) == 1  # a stub, in a fresh kernel
    out = capsys.readouterr().out
    assert "FAILED" in out and "0/1 exercises passed" in out
    csv_path = tmp_path / "grades.csv"
    assert cli.main(["grade", "--in-process", "--csv", str(csv_path), str(EXERCISES / "solutions")]) == 0
    assert capsys.readouterr().out.count("exercises passed") == 7
    assert len(csv_path.read_text().splitlines()) == 1 + 16

    for argv, needle in ((["grade", str(tmp_path / "missing.ipynb")], "no such notebook"),
                         (["grade", str(ROOT / "notebooks" / "03_dpo_gradient.ipynb")], "not an exercise notebook"),
                         (["grade", str(tmp_path / "empty_dir")], "no .ipynb")):
        (tmp_path / "empty_dir").mkdir(exist_ok=True)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
