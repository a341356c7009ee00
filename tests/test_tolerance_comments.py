"""Every numerical tolerance in tests/ says in a comment what it bounds (issue 20).

A tolerance tuned on one CPU fails on another (float kernels and summation order differ between AVX2,
AVX-512/AMX and ARM), so each one carries a comment deriving it: float32 rounding over a reduction of
length n, an int8 quantization step, a kernel-choice difference, a statistical effect, ... This is a
plain text scan, cheap by design. A line is a *tolerance line* when its code matches one of PATTERNS; it
is *justified* when it carries a ``#`` comment, when the line above is a comment line, or when the line
above is justified and is a tolerance line too or ends in ``(``, ``[`` or ``,`` (one comment above a
group of consecutive tolerance lines, or above a statement split over lines, covers the group).
"""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PATTERNS = {
    "tolerance keyword": r"\b(atol|rtol|abs|rel)\s*=|ATOL\b|_atol\b",  # assert_close / allclose / approx arguments
    "approx": r"pytest\.approx\(",  # default rel=1e-6: a tolerance too
    "close": r"assert_close\(|allclose\(|isclose\(",  # defaults for float32: rtol 1.3e-6, atol 1e-5
    "below 1e-k": r"[<>]=?\s*[\d.]+e-\d",  # `err < 1e-2 * scale`
    "below 0.0x": r"[<>]=?\s*0\.0\d*",  # `abs(a - b) < 0.01`, `diff.max() < 0.05 * ...`
    "abs difference": r"abs\(.*[<>]=?\s*\d*\.\d",  # `(a - b).abs().mean() < 0.5` (not `> 0`, not `<= 64`)
    "argmax agreement": r"argmax\(.*==.*argmax\(",  # two models' predictions agree on a fraction
    "named tolerance": r"\btolerance\b|SLACK|AGREEMENT|MAX_DIFF",  # a bound kept in a variable
}
MATCH = re.compile("|".join(f"(?:{p})" for p in PATTERNS.values()))
THIS_FILE = Path(__file__).name


def unjustified(lines: list[str]) -> list[int]:
    """Indices of the tolerance lines that no comment justifies (the rule in the module docstring)."""
    justified = [False] * len(lines)
    tolerance = [bool(MATCH.search(line.split("#")[0])) for line in lines]
    for i, line in enumerate(lines):
        above = lines[i - 1].rstrip() if i else ""
        grouped = i > 0 and justified[i - 1] and (tolerance[i - 1] or above.endswith(("(", "[", ",")))
        justified[i] = "#" in line or above.lstrip().startswith("#") or grouped
    return [i for i in range(len(lines)) if tolerance[i] and not justified[i]]


def tolerance_lines_without_comment() -> list[str]:
    missing = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == THIS_FILE:  # its patterns are examples, not tolerances
            continue
        lines = path.read_text().splitlines()
        missing += [f"{path.relative_to(TESTS)}:{i + 1}: {lines[i].strip()}" for i in unjustified(lines)]
    return missing


def test_every_tolerance_says_what_it_bounds():
    missing = tolerance_lines_without_comment()
    assert not missing, (
        "tolerance lines with no comment on them or on the line above (say what the tolerance bounds, "
        "derived so that it holds on any CPU):\n" + "\n".join(missing)
    )


def test_the_scan_finds_an_unjustified_tolerance():
    """The patterns catch the kinds of tolerance this suite uses, and a comment clears them."""
    bare = [
        "torch.testing.assert_close(a, b)",
        "assert x == pytest.approx(0.5)",
        "assert abs(a - b) < 0.02",
        "assert err < 1e-2 * scale",
        "assert torch.allclose(a, b, atol=1e-6)",
        "assert (a - b).abs().mean() < 0.5",
        "assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.97",
        "ATOL = 1e-4",
        "assert loss <= plain + TRAIN_LOSS_SLACK",
    ]
    for line in bare:
        assert MATCH.search(line), line
    for line in ["assert x == 3", "assert len(xs) < 10", "mask = scores > threshold"]:
        assert not MATCH.search(line), line
    code = [
        "x = 1",
        "assert abs(a - b) < 0.02",  # 1: bare, flagged
        "# float32 rounding over 8 terms",
        "assert abs(a - b) < 1e-6",  # 3: the comment above covers it
        "assert abs(c - d) < 1e-6",  # 4: and the tolerance line that follows it
        "y = 2",
        "assert abs(e - f) < 1e-6",  # 6: flagged again after code
        "torch.testing.assert_close(  # one element: exact",
        "    a, b, atol=0, rtol=0",  # 8: continues a justified statement
        ")",
    ]
    assert unjustified(code) == [1, 6]
