"""Regenerate the README's method table from the catalog (`lorakit methods --markdown`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

readme = Path(__file__).parents[1] / "README.md"
table = subprocess.run([sys.executable, "-m", "lorakit.cli", "methods", "--markdown"], check=True,
                       capture_output=True, text=True).stdout.strip()
text = readme.read_text()
new = re.sub(r"<!-- methods:start -->.*<!-- methods:end -->",
             lambda _: f"<!-- methods:start -->\n{table}\n<!-- methods:end -->", text, flags=re.S)
readme.write_text(new)
print(f"README method table: {table.count(chr(10)) - 1} rows")
