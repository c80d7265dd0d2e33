"""
The one reader of the JSON files the commands are given (config.json, generation_config.json,
tokenizer_config.json, a dataset's meta.json, a checkpoint's train_state.json, eval.py's results): each
is user input, so what json.load would let through is checked here, once, for all of them.

    cfg = read_json(path, types=CONFIG_TYPES)   # a dict, or a JSONFileError: one line naming the file and key

What it refuses, each in one line: a file that is not JSON, nesting too deep for the parser (json.load
raises RecursionError past about a thousand levels), an integer of more digits than any count, id or
size (Python refuses to convert 4300 and more, with a ValueError of its own), a file that is not a JSON
object, and a key of the wrong JSON type (`"model_type": ["llama"]`: a list where a string belongs).
"""

import json

from support.common import UserError

MAX_DIGITS = 30  # 10^30 is past any vocabulary, step, size or seed a file of ours can hold

# what each key a command reads must be, where JSON has a choice (None: null is allowed)
STRING, NUMBER = (str,), (int, float)
CONFIG_TYPES = {"model_type": STRING, "hidden_act": STRING, "torch_dtype": STRING + (type(None),),
                "dtype": STRING + (type(None),), "architectures": (list, type(None))}  # rope_*: rope.py's own checks
TOKENIZER_CONFIG_TYPES = {"add_bos_token": (bool, type(None)), "bos_token": (str, dict, type(None)),
                          "eos_token": (str, dict, type(None)), "model_max_length": NUMBER + (type(None),)}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list",
              bool: "true or false", type(None): "null"}


class JSONFileError(UserError, ValueError):
    """A JSON file we cannot use; the message is one line naming the file (and the key)."""


def parse_int(text):
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def loads(text, where):
    """json.loads with the checks of read_json (no object required): for a line of a .jsonl file."""
    try:
        return json.loads(text, parse_int=parse_int)
    except RecursionError:
        raise JSONFileError(f"{where}: nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise JSONFileError(f"{where} is not valid JSON ({e})") from None


def read_json(path, types=None):
    """The JSON object in `path`, its keys of `types` ({key: allowed Python types}) checked. OSError (no such
    file) is left to the caller; anything else is a JSONFileError naming the file, and the key."""
    with open(path, "rb") as f:
        obj = loads(f.read(), path)
    if not isinstance(obj, dict):
        raise JSONFileError(f"{path}: not a JSON object (a {TYPE_NAMES.get(type(obj), type(obj).__name__)})")
    for key, kinds in (types or {}).items():
        if key in obj and not isinstance(obj[key], kinds):
            want = " or ".join(TYPE_NAMES[k] for k in kinds)
            raise JSONFileError(f"{path}: {key} must be {want}, got {TYPE_NAMES.get(type(obj[key]), 'another type')}")
    return obj
