"""The README runs as written: its Python examples (and docs/api.md's) execute, and every fenced shell command
(also in the task and benchmark pages) names a script that exists and only flags (and choices) its argparse accepts."""
import argparse
import contextlib
import functools
import importlib.util
import io
import os
import pathlib
import re
import runpy
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
LAUNCHERS = {"torchrun", ".venv/bin/torchrun"}
LAUNCH_MODULES = {"torch.distributed.launch", "torch.distributed.run"}
#: commands that are not this project's scripts: only their presence is allowed, nothing is checked
EXTERNAL = {"pip", ".venv/bin/pip", "pip3", "source", "export", "ls", "cat", "mkdir", "nvidia-smi", "tensorboard",
            ".venv/bin/tensorboard"}
PROJECT_PACKAGES = ("classification", "detection", "segmentation", "common", "benchmarks", "quant", "snn")


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_python_examples_run(doc, tmp_path, monkeypatch):
    text = (ROOT / doc).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{doc} has no python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, doc, "exec"), {"__name__": "readme"})


# ------------------------------------------------------------------------------------- shell commands
def shell_blocks(text):
    """The fenced ``bash`` / ``sh`` / ``shell`` blocks of a Markdown text."""
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)


def split_commands(block):
    """One block -> lists of words, one per simple command (``&&``, ``;``, ``|`` and lines split them;
    comments and line continuations handled as the shell does; ``$VAR`` set earlier in the block expanded)."""
    env, commands = {}, []
    for line in block.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        words, cur = list(lex), []
        for w in words + [";"]:
            if w in ("&&", ";", "|", "||", "&"):
                if cur:
                    commands.append(cur)
                cur = []
                continue
            cur.append(re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), w))
        # a lone assignment line (S=classification/cifar10) sets a variable for the rest of the block
        while commands and len(commands[-1]) == 1 and re.fullmatch(r"\w+=\S*", commands[-1][0]):
            k, v = commands.pop()[0].split("=", 1)
            env[k] = v
    return commands


class _Parsed(BaseException):
    """Raised out of a script once its argparse has run (BaseException: no script catches it)."""

    def __init__(self, parser, error=None):
        super().__init__(error)
        self.parser, self.error = parser, error


def parse_with_script(run, argv):
    """Run ``run()`` (a script as ``__main__``) with ``sys.argv[1:] = argv`` until its first
    ``ArgumentParser.parse_args``; return ``(parser, error message or None)``. The script's work never runs."""
    original, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def guarded(parser, call, *a):
        def error(message):
            raise _Parsed(parser, message)
        parser.error = error
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return call(parser, *a)
        except SystemExit as e:         # --help
            raise _Parsed(parser, None if e.code in (0, None) else f"exit {e.code}")

    def parse_known_args(self, args=None, namespace=None):     # a pre-pass (presets) may call it first
        return guarded(self, original_known, args, namespace)

    def parse_args(self, args=None, namespace=None):
        guarded(self, original, args, namespace)
        raise _Parsed(self)

    saved = sys.argv[:], sys.path[:]
    argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = parse_args, parse_known_args
    err = io.StringIO()
    try:
        sys.argv = ["script"] + list(argv)
        with contextlib.redirect_stderr(err):
            run()
    except _Parsed as p:
        return p.parser, p.error
    except (Exception, SystemExit) as e:      # a preset / config check of the script refused the arguments
        lines = err.getvalue().strip().splitlines()
        return None, lines[-1] if lines else f"{type(e).__name__}: {e}"
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original, original_known
        sys.argv[:], sys.path[:] = saved
    raise AssertionError("the script finished without calling ArgumentParser.parse_args")


def _python_target(words, cwd):
    """Words after ``python`` (launcher options stripped) -> (('file', path) | ('module', name), argv)."""
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-m":
            mod = words[i + 1]
            if mod in LAUNCH_MODULES:      # python -m torch.distributed.launch [its options] script.py ...
                return _launched(words[i + 2:], cwd)
            return ("module", mod), words[i + 2:]
        if w.startswith("-"):
            i += 1
            continue
        return ("file", os.path.normpath(os.path.join(cwd, w))), words[i + 1:]
    raise AssertionError("no script named")


def _launched(words, cwd):
    """The options of torchrun / torch.distributed.launch, then the script and its arguments."""
    i = 0
    while i < len(words) and words[i].startswith("-") and words[i] != "-m":
        i += 1 if "=" in words[i] or words[i] in ("--standalone", "--use_env", "--use-env") else 2
    if i < len(words) and words[i] == "-m":
        return ("module", words[i + 1]), words[i + 2:]
    return ("file", os.path.normpath(os.path.join(cwd, words[i]))), words[i + 1:]


def _runner(target):
    kind, name = target
    if kind == "module":
        if name.split(".")[0] not in PROJECT_PACKAGES or importlib.util.find_spec(name) is None:
            raise AssertionError(f"python -m {name}: no such module in this project")
        return lambda: runpy.run_module(name, run_name="__main__", alter_sys=True)
    path = ROOT / name
    if not path.is_file():
        raise AssertionError(f"{name}: no such script (relative to the repository root)")
    return lambda: runpy.run_path(str(path), run_name="__main__")


def _flags(argv):
    """The option words of an argument list (values, positionals and anything after ``--`` left out)."""
    out = []
    for w in argv:
        if w == "--":
            break
        if w.startswith("-") and not re.fullmatch(r"-\d[\d.e-]*", w):
            out.append(w.split("=", 1)[0])
    return out


def _forwarded(sh_text):
    """What a shell script hands its arguments to: ``exec ... -m MOD "$@"`` -> [('module', MOD)];
    otherwise every ``DIR/x.py`` it runs (``$S/x.py`` with ``S=DIR`` resolved) -> [('file', path), ...]."""
    m = re.search(r"^exec \S+ -m ([\w.]+) \"\$@\"", sh_text, flags=re.M)
    if m:
        return [("module", m.group(1))] if m.group(1).split(".")[0] in PROJECT_PACKAGES else []
    sh_text = "\n".join(line for line in sh_text.splitlines() if not line.lstrip().startswith("#"))
    env = dict(re.findall(r"^(\w+)=([\w/]+)$", sh_text, flags=re.M))
    found = []
    for var, lit, name in re.findall(r"(?:\"?\$\{?(\w+)\}?/|([\w/]+)/)(\w+\.py)", sh_text):
        folder = env.get(var) if var else lit
        if folder and (ROOT / folder / name).is_file() and ("file", f"{folder}/{name}") not in found:
            found.append(("file", f"{folder}/{name}"))
    return found


@functools.lru_cache(maxsize=None)
def _options(target):
    """Every option string of a script's parser."""
    parser, error = parse_with_script(_runner(target), ["--help"])
    if parser is None:
        raise AssertionError(f"{target[1]} --help: {error}")
    return frozenset(parser._option_string_actions)


def check_command(words, cwd="."):
    """Problems (strings) with one README command; ``cwd`` is the folder (relative to the root) it runs in."""
    while words and re.fullmatch(r"\w+=.*", words[0]):      # EPOCHS=30 DRY=1 bash ...
        words = words[1:]
    if not words:
        return []
    cmd, rest = words[0], words[1:]
    try:
        if cmd == "cd":
            return [] if (ROOT / cwd / rest[0]).is_dir() else [f"cd {rest[0]}: no such folder"]
        if cmd in EXTERNAL:
            return []
        if cmd in PYTHONS or cmd in LAUNCHERS:
            target, argv = _python_target(rest, cwd) if cmd in PYTHONS else _launched(rest, cwd)
            _, error = parse_with_script(_runner(target), argv)
            return [f"{' '.join(words)}: {error}"] if error else []
        if cmd == "bash":
            script = os.path.normpath(os.path.join(cwd, rest[0]))
            path = ROOT / script
            if not path.is_file():
                return [f"bash {rest[0]}: no such script"]
            text, problems = path.read_text(), []
            targets = _forwarded(text)
            for flag in _flags(rest[1:]):
                if re.search(r"(^|[\s|(])" + re.escape(flag) + r"[)|=]", text, flags=re.M):
                    continue                                 # the shell script's own option (case label)
                for t in targets:
                    if flag not in _options(t):
                        problems.append(f"bash {script}: {flag} reaches {t[1]}, which has no such option")
                if not targets:
                    problems.append(f"bash {script}: {flag} is not an option of it")
            if targets and targets[0][0] == "module" and len(targets) == 1:   # exec: a full parse
                _, error = parse_with_script(_runner(targets[0]), rest[1:])
                if error:
                    problems.append(f"{' '.join(words)}: {error}")
            return problems
    except AssertionError as e:
        return [f"{' '.join(words)}: {e}"]
    return [f"{' '.join(words)}: not a command of this project (python / torchrun / bash scripts/...)"]


def check_block(block):
    cwd, problems = ".", []
    for words in split_commands(block):
        problems += check_command(words, cwd)
        if words[0] == "cd" and not problems:
            cwd = os.path.normpath(os.path.join(cwd, words[1]))
    return problems


@pytest.mark.parametrize("doc", ["README.md", "docs/classification.md", "docs/detection.md", "docs/segmentation.md",
                                 "docs/fidelity.md", "benchmarks/README.md"])
def test_shell_commands_name_real_scripts_and_flags(doc):
    blocks = shell_blocks((ROOT / doc).read_text())
    assert blocks, f"{doc} has no shell commands"
    problems = [p for b in blocks for p in check_block(b)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block, expected", [
    ("python classification/cifar10/snn.py --arch alex --bitt 2 -e", "--bitt"),          # misspelled flag
    ("python classification/cifar10/main.py --arch alexx --bit 32", "alexx"),             # not a choice
    ("python classification/cifar10/nosuch.py --arch alex", "no such script"),
    ("python -m classification.demoo --quick", "no such module"),
    ("bash scripts/demo.sh --seeed 1", "--seeed"),                                       # exec-forwarded
    ("bash scripts/nosuch.sh", "no such script"),
    ("bash scripts/cifar10_chain.sh resnet20 --datset cifar10", "--datset"),             # reaches main.py ...
    ("cd detection && python eval.py -d voc --spikee", "--spikee"),                      # runs in detection/
    ("cd detection && python detection/eval.py -d voc", "no such script"),               # ... so this path is wrong
    ("python -m torch.distributed.launch --nproc_per_node=2 classification/imagenet/snn.py -a alexnet --bitt 2 /d",
     "--bitt"),
    ("torchrun --nproc_per_node 2 segmentation/train.py -m deeplabv1_vgg9 --bti 4", "--bti"),
    ("S=classification/cifar10\npython $S/snn_ft.py --arch alex -n 1 --forse", "--forse"),
    ("python segmentation/eval.py --config coco_deeplabv3_T77", "no such preset"),            # checked by the script
    ("make all", "not a command of this project"),
])
def test_readme_command_check_finds_mistakes(block, expected):
    problems = check_block(block)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("block", [
    "python classification/cifar10/snn.py --arch alex --bit 2 -id 2 -e -u --init result/alex_2bit/model_best.pth.tar",
    "cd detection && python eval.py -d voc --cuda -v yolov2_tiny --bit 2 --spike --init CHECKPOINT_PATH",
    "python -m torch.distributed.launch --nproc_per_node=4 classification/imagenet/dali_main.py -a alexnet -b 256 "
    "--bit 4 --workers 4 --lr=0.025 --epochs 60 --dali_cpu /data/imagenet2012",
    "EPOCHS=30 bash scripts/cifar10_chain.sh resnet20 --out runs/r20 --dataset fashionmnist  # a comment --nope",
    "bash scripts/demo_seeds.sh --seeds 0 1 2 -- --epochs-fp 5",
    "python -m classification.demo --help",
])
def test_readme_command_check_accepts_correct_commands(block):
    assert check_block(block) == []


#: each task / benchmark page documents every flag of these scripts
FLAG_PAGES = {
    "docs/classification.md": ["classification/cifar10/main.py", "classification/cifar10/snn.py",
                               "classification/cifar10/snn_ft.py", "classification/imagenet/dali_main.py",
                               "classification/imagenet/snn.py", "classification/imagenet/snn_ft.py",
                               "-m classification.demo", "-m classification.demo_seeds"],
    "docs/detection.md": ["detection/train.py", "detection/eval.py", "detection/snn_ft.py", "detection/demo.py",
                          "-m detection.offline_demo", "-m detection.pretrain", "-m common.scenes"],
    "docs/segmentation.md": ["segmentation/train.py", "segmentation/eval.py", "segmentation/snn_ft.py",
                             "segmentation/inference.py", "-m segmentation.demo", "-m segmentation.pretrain"],
    "benchmarks/README.md": ["benchmarks/snn_speed.py", "benchmarks/if_kernels.py", "benchmarks/kernel_ab.py",
                             "benchmarks/quant_overhead.py", "benchmarks/finetune_cost.py", "benchmarks/dense_memory.py"],
}


@pytest.mark.parametrize("doc", sorted(FLAG_PAGES))
def test_pages_document_every_flag(doc):
    text = (ROOT / doc).read_text()
    missing = []
    for script in FLAG_PAGES[doc]:
        target = ("module", script[3:]) if script.startswith("-m ") else ("file", script)
        parser, error = parse_with_script(_runner(target), ["--help"])
        assert parser is not None, f"{script} --help: {error}"
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help" and \
                    not any(f"`{o}`" in text for o in action.option_strings):
                missing.append(f"{script} {action.option_strings[-1]}")
    assert not missing, f"{doc} does not document: " + ", ".join(missing)
