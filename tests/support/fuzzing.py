"""What the fuzz tests ran, for pytest's summary (tests/conftest.py prints it at the end)."""

#: one line per fuzzed parser: "fuzz: <parser>: <n> inputs in <s> s"
REPORT: list[str] = []
