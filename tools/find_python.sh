#!/bin/sh
# Prints the interpreter `make` builds .venv with: a Python 3.12 if one runs here (JAX 0.11 and
# later need Python >= 3.12, so this gets the current JAX), else `python3` (on 3.10 / 3.11 pip
# takes JAX 0.10, the floor setup.py allows). pyenv's shims refuse a version that is installed
# but not selected, so pyenv's own versions are looked at too. `make PYTHON=...` overrides.
if python3.12 -c 'import sys' >/dev/null 2>&1; then
  command -v python3.12
  exit 0
fi
if command -v pyenv >/dev/null 2>&1; then
  version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | tail -n 1)
  candidate="$(pyenv root)/versions/$version/bin/python3.12"
  if [ -n "$version" ] && "$candidate" -c 'import sys' >/dev/null 2>&1; then
    echo "$candidate"
    exit 0
  fi
fi
echo python3
