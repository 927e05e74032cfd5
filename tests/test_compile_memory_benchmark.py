"""The committed compile-time and memory study (benchmarks/compile_memory.py)."""


def test_committed_compile_and_memory_study_meets_its_targets(tmp_path):
  # benchmarks/results/compile_memory.json (written by
  # benchmarks/compile_memory.py): at 1,000 leaves per level jbl.run compiles
  # within 1.5x of the hand-written scan, and 100 runs in one process hold
  # resident memory within 50 MB. The table regenerates from the JSON.
  import json  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(__file__).resolve().parents[1]
  results = root / "benchmarks" / "results" / "compile_memory.json"
  data = json.loads(results.read_text())
  big = [r for r in data["rows"] if r["leaves_per_level"] == 1000][0]
  assert big["run_over_hand"] <= 1.5 and big["sweep_over_hand"] <= 1.5
  assert data["many_runs"]["runs"] == 100
  assert abs(data["many_runs"]["growth_mb"]) <= 50
  copy = tmp_path / "compile_memory.json"
  shutil.copy(results, copy)
  subprocess.run([sys.executable, str(root / "benchmarks" / "compile_memory.py"),
                  "--markdown", str(copy)], check=True, capture_output=True)
  assert (tmp_path / "compile_memory.md").read_text() == (
      results.with_suffix(".md").read_text())
