"""How each bad input ends: the per-module counts of issue 17's closing note.

Tries every case of the guard tests' tables (tests/test_guards*.py: the inventory of bad inputs) on a tiny
GPT-2, plus the warnings, the legitimate inputs that must work, the report's remote loads and the state
checks, and prints per module how each ended:

  clear error    raised by interplab itself (the raising frame is in the package), before the work
  unclear error  raised deep inside torch, nnsight, ipywidgets or Python
  late error     raised only after the work it should have preceded
  warning        returned, with a warning
  silent         returned a result without a word (for a bad input)
  fine / wrong   returned the right / a wrong result (for a legitimate input that must work)
  leak           left the model changed (parameters, mode, gradients, hooks)

Run it against any checkout: `PYTHONPATH=<checkout> python benchmarks/guards.py` from this repository's root
(the cases come from this repository's tests; the code under test from the path first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_guards as G  # noqa: E402
import test_guards_methods as GM  # noqa: E402
import test_guards_state as GS  # noqa: E402
from model_state import differences, snapshot  # noqa: E402

import interplab as il  # noqa: E402

TABLES = {"training": G.TRAINING, "scores": G.SCORES, "model/analyses": G.MODEL, "tasks": G.TASKS,
          "evolution": G.EVOLUTION, "circuits": G.CIRCUITS, "weights": G.WEIGHTS, "edits": GM.EDITS,
          "decompose": GM.DECOMPOSE,
          "updates": GM.UPDATES, "truthfulness/stats/configs": GM.TRUTH, "widgets": GM.WIDGETS}
PACKAGE = str(Path(il.__file__).resolve().parent)


def _raised_by_package(error: BaseException) -> bool:
    """True when a `raise` statement in interplab raised it (not an operation that failed inside it)."""
    frames = traceback.extract_tb(error.__traceback__)
    return (bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(PACKAGE)
            and (frames[-1].line or "").lstrip().startswith("raise"))


def outcome(call, legitimate=None) -> str:
    """How `call()` ends; `legitimate`, for an input that must work, checks the result (True when right)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - classifying every way a call can end is the point
            if str(error).startswith("late:"):
                return "late error"
            return "clear error" if _raised_by_package(error) else "unclear error"
    said = [w for w in caught if issubclass(w.category, (UserWarning, RuntimeWarning))
            and not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    if legitimate is not None:
        return "fine" if legitimate(result) else "wrong"
    return "warning" if said else "silent"


def state_outcome(m, call, parameters: bool) -> str:
    before = snapshot(m.hf, parameters)
    try:
        call(m)
    except BaseException:  # noqa: BLE001 - an interrupted call must restore the state too
        pass
    return "leak" if differences(before, snapshot(m.hf, parameters)) else "restored"


def extra_cases(env, tmp: Path) -> dict[str, list[tuple[str, object, bool]]]:
    """(name, call, legitimate) cases outside the tables: warnings, inputs that must work (legitimate checks
    the result), early checks."""
    heads = lambda v: il.Scores(torch.tensor(v), ("layer", "head"))  # noqa: E731
    return {
        "scores": [("Scores holding NaN", lambda: il.Scores(torch.tensor([float("nan")]), ("x",)), None),
                   ("distance of (layer, head) scores", lambda: il.evolution.circuit_distance(
                       heads([[3.0, 0.0], [0.0, 2.0]]), heads([[3.0, 2.0], [0.0, 0.0]]), 2),
                       lambda d: abs(d - 2 / 3) < 1e-9)],
        "model/analyses": [("unknown word", lambda: env.m.to_tokens("The zzqx is"), None)],
        "tasks": [("boolean mask", lambda: env.task[[True, False, True, False]],
                   lambda t: torch.equal(t.clean, env.task.clean[[0, 2]]))],
        "edits": [("overflowing ITI", lambda: GM.edits.iti(env.m, GM._probe(env.m, 1e150), [(0, 1), (1, 0)], 1e150)
                   .logits(env.task.clean), None),
                  ("edit loaded on another family", lambda: GM._save_load_across_families(env, tmp / "edit"), None)],
        "evolution": [("track(k=25) sweeps first", lambda: _late_k(env), None)],
    }


def _late_k(env):
    calls = []

    def locator(m, task):
        calls.append(m)
        return G._locator(m, task)

    try:
        il.evolution.track([("a", env.m), ("b", env.m)], [env.task], k=25, locator=locator, progress=False)
    except Exception:
        if calls:
            raise RuntimeError("late: the error came after the sweep") from None
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="print every case's outcome")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import tempfile

    env = G.make_env()
    counts: dict[str, Counter] = defaultdict(Counter)
    with tempfile.TemporaryDirectory() as tmp:
        for module, table in TABLES.items():
            for name, (fn, _, _) in table.items():
                result = outcome(lambda fn=fn: fn(env))
                counts[module][result] += 1
                if args.verbose:
                    print(f"{module:28} {name:36} {result}")
        for module, cases in extra_cases(env, Path(tmp)).items():
            for name, call, legitimate in cases:
                result = outcome(call, legitimate)
                counts[module][result] += 1
                if args.verbose:
                    print(f"{module:28} {name:36} {result}")
    for name, html in GM.LOADS.items():
        result = "found" if il.ui.report.remote_loads(html) else "missed"
        counts["report"][result] += 1
        if args.verbose:
            print(f"{'report':28} {name:36} {result}")
    for name, (call, _, parameters) in GS.STATE.items():
        result = state_outcome(il.load(G.gpt2(), tokenizer=G.TOK), call, parameters)
        counts["state"][result] += 1
        if args.verbose:
            print(f"{'state':28} {name:36} {result}")
    total = Counter()
    print(f"\n{'module':28} {'tried':>5}  outcomes")
    for module, counter in counts.items():
        total.update(counter)
        print(f"{module:28} {sum(counter.values()):>5}  " + ", ".join(f"{n} {k}" for k, n in counter.most_common()))
    print(f"{'all':28} {sum(total.values()):>5}  " + ", ".join(f"{n} {k}" for k, n in total.most_common()))


if __name__ == "__main__":
    main()
