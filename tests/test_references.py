"""Every repository path the tree names -- in a comment, a docstring, a doc or the Makefile -- exists,
and a name cited as `<file>'s NAME` or `(<file> NAME)` is defined in that file; nothing points
outside the tree (the contract is docs/design.md, in the repository)."""
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP = ("fastkd", "csrc", "kernels", "docs", "tests", "tools", "benchmarks", "examples", ".ci")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w])" % "|".join(re.escape(t) for t in TOP))
CITED = re.compile(r"(?:((?:fastkd|tools|tests|benchmarks)/[\w/]+\.py)'s `?([A-Za-z_]\w*)|"
                   r"\(((?:fastkd|tools|tests|benchmarks)/[\w/]+\.py) `?([A-Za-z_]\w*)`?\))")
SUFFIXES = {".py", ".md", ".h", ".cuh", ".cu", ".cpp", ".toml", ".sh", ".in", ""}


def _files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if (ROOT / f).is_file() and (ROOT / f).suffix in SUFFIXES
            and not f.startswith("benchmarks/results/") and f != "tests/test_references.py"]


def _exists(ref: str, after: str = "") -> bool:
    """Whether a path named in the tree exists; `after`: the character that follows it in the text
    (a template -- gpu-$(...).md, isa_*.cpp, <op>.py -- names a directory that must exist)."""
    ref = ref.rstrip(".")
    if after and after.lstrip("-_.")[:1] in tuple("<>*{$"):
        return (ROOT / ref).parent.is_dir()
    path = ROOT / ref
    if path.exists():
        return True
    # a build output or a file the tools write (build/, $(OUT)/...): not in the tree by design
    return ref.startswith(("docs/img/",)) and path.parent.is_dir()


def _defines(path: pathlib.Path, name: str) -> bool:
    text = path.read_text()
    return re.search(rf"^\s*(def|class)\s+{name}\b|^\s*{name}\s*(:[^=]*)?=|^{name}\b", text, re.M) is not None


def test_named_paths_exist():
    missing = []
    for f in _files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for m in PATH.finditer(line):
                ref = m.group(1)
                if not _exists(ref, line[m.end():m.end() + 2]):
                    missing.append(f"{f.relative_to(ROOT)}:{n}: {ref}")
    assert not missing, "paths named in the tree that do not exist:\n" + "\n".join(missing)


def test_cited_names_are_defined_where_cited():
    wrong = []
    for f in _files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for groups in CITED.findall(line):
                ref, name = (groups[0], groups[1]) if groups[0] else (groups[2], groups[3])
                target = ROOT / ref
                if target.is_file() and (name.isupper() or "_" in name) and not _defines(target, name):
                    wrong.append(f"{f.relative_to(ROOT)}:{n}: {ref} does not define {name}")
    assert not wrong, "\n".join(wrong)


def test_nothing_points_outside_the_tree():
    outside = [f"{f.relative_to(ROOT)}" for f in _files() if "../shared" in f.read_text(errors="replace")]
    assert not outside, f"these cite a path outside the repository: {outside}"


def test_the_checks_can_fail(tmp_path):
    """The patterns find what they must (so the tests above could fail)."""
    assert PATH.findall("see fastkd/no_such_module.py and csrc/kd_math.h.") == ["fastkd/no_such_module.py",
                                                                               "csrc/kd_math.h"]
    assert not _exists("fastkd/no_such_module.py") and _exists("csrc/kd_math.h.")
    assert _exists("fastkd/reference/", "<") and not _exists("fastkd/no_dir/x", "*")
    assert CITED.findall("(fastkd/_math.py grad_dtype)") == [("", "", "fastkd/_math.py", "grad_dtype")]
    assert CITED.findall("run tests/hf_ddp_case.py OUT") == []
    assert not _defines(ROOT / "fastkd/_math.py", "grad_dtype") and _defines(ROOT / "fastkd/_ops.py", "grad_dtype")
