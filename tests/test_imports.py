"""Every packager/runtimes module imports with only the core dependencies.

A subprocess blocks the optional frameworks (as if not installed) and imports every module:
framework imports must stay inside the functions that use them.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("torch", "tensorflow", "keras", "tf2onnx", "paddle", "paddle2onnx", "ray", "pyarrow", "matplotlib",
            "polygraphy", "onnxscript", "openvino", "ai_edge_litert", "fastapi", "starlette", "uvicorn",
            "prometheus_client", "tritonclient")

SCRIPT = textwrap.dedent("""
    import importlib, pkgutil, sys
    BLOCKED = set({blocked!r})

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: optional dependency")
            return None

    sys.meta_path.insert(0, Block())
    import packager, runtimes
    failed = []
    for pkg in (packager, runtimes):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(info.name)
            except Exception as exc:
                # Training callbacks subclass their framework's Callback: they may need it at
                # import, but must then say so as a DependencyError with the pip fix.
                if info.name.startswith("packager.callbacks.") and "pip install 'packager[" in str(exc):
                    continue
                failed.append(f"{{info.name}}: {{type(exc).__name__}}: {{exc}}")
    print("\\n".join(failed) or "OK")
""")


def test_every_module_imports_with_core_dependencies_only():
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=OPTIONAL)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK", proc.stdout


def test_missing_runtime_is_a_clear_dependency_error(tmp_path):
    script = SCRIPT.split("import packager, runtimes")[0].format(blocked=("torch",)) + textwrap.dedent("""
        import runtimes
        from packager.errors import DependencyError
        open({path!r}, "wb").write(b"PK")
        try:
            runtimes.load({path!r}, format="torchscript")
        except DependencyError as exc:
            print(exc.message)
    """).format(path=str(tmp_path / "m.pt"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "pip install 'packager[torch]'" in proc.stdout, proc.stdout + proc.stderr


def test_tensorflow_then_paddle_in_one_process():
    # paddle 3.3 imported after TensorFlow 2.21 crashes the process (SIGSEGV); import_tf
    # imports paddle first when it is installed, so a process can use both in any order.
    import importlib.util

    import pytest

    if not (importlib.util.find_spec("paddle") and importlib.util.find_spec("tensorflow")):
        pytest.skip("needs both paddle and tensorflow")
    script = ("from runtimes._tf import import_tf\ntf = import_tf()\nimport paddle\n"
              "print(float((paddle.ones([2]) * 2).sum()) + float(tf.reduce_sum(tf.ones([2]))))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("6.0")
