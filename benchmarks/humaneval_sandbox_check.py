"""The HumanEval sandbox against its data: every reference solution must pass, every empty body must fail, and
programs that exit early, kill their parent, fork and escape, or delete files must fail without harming this process.

    python benchmarks/humaneval_sandbox_check.py [../shared/data/HumanEval.jsonl.gz]
"""
import gzip
import json
import subprocess
import sys
import time

from kvpred.tasks import _namespace_prefix, execute_program, humaneval_program

HOSTILE = {
    "exits early with status 0": "    import sys\n    sys.exit(0)\n",
    "kills its parent (os.kill)": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n",
    "kills its parent (posix.kill)": "    import posix\n    posix.kill(posix.getppid(), 9)\n",
    "forks a child that escapes with setsid": "    import posix, time\n    if posix.fork() == 0:\n"
                                              "        posix.setsid(); time.sleep(30)\n    return None\n",
    "deletes its own file": "    import os\n    os.remove(__file__)\n",
}


def main(path: str = "../shared/data/HumanEval.jsonl.gz") -> None:
    problems = [json.loads(line) for line in gzip.open(path, "rt")]
    print(f"namespaces: {' '.join(_namespace_prefix()) or 'none (unshare not allowed here)'}")
    start = time.perf_counter()
    reference = [execute_program(humaneval_program(p, p["canonical_solution"])) for p in problems]
    print(f"reference solutions: {reference.count('passed')} of {len(problems)} pass "
          f"({time.perf_counter() - start:.1f} s)")
    empty = [execute_program(humaneval_program(p, "    pass\n")) for p in problems]
    print(f"empty bodies: {empty.count('passed')} of {len(problems)} pass")
    for what, body in HOSTILE.items():
        print(f"a program that {what}: {execute_program(humaneval_program(problems[0], body), 5.0)}")
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", "kvpred-exec-"], capture_output=True, text=True).stdout.split()
    print(f"this process is still running; sandboxed processes left behind: {len(left)}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
