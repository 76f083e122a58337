"""Shared check for bad-input tests: the call raises one ValueError, on one line, naming words."""

import pytest


def assert_one_line_error(call, words) -> None:
  with pytest.raises(ValueError) as info:
    call()
  message = str(info.value)
  assert '\n' not in message, message
  for word in words:
    assert word in message, (word, message)
