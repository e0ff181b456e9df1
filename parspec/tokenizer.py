"""tokenizer.json (HF `tokenizers`) + tokenizer_config.json / generation_config.json (else
config.json): special tokens, eos ids and the chat template, rendered with jinja2."""

from __future__ import annotations

import os
from datetime import datetime

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from parspec.config import ConfigError, read_json
from parspec.loader import LoadError


def _token_str(value) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise LoadError(f"tokenizer.json not found in {model_dir} "
                            "(pass skip_tokenizer_init=True to work with token ids only)")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise LoadError(f"cannot read {path}: {e}") from e
        cfg = self._read_optional(model_dir, "tokenizer_config.json")
        # As HF and vLLM do: without a generation_config.json, the generation defaults (eos
        # included) come from config.json.
        has_gen = os.path.isfile(os.path.join(model_dir, "generation_config.json"))
        gen = self._read_optional(model_dir, "generation_config.json" if has_gen else "config.json")
        self.chat_template = cfg.get("chat_template")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos = gen.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            eos_ids.append(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = sorted(set(eos_ids))

    @staticmethod
    def _read_optional(model_dir: str, name: str) -> dict:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            return {}
        try:
            return read_json(path, name)
        except ConfigError as e:
            raise LoadError(str(e)) from e

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ConfigError("this tokenizer has no chat_template in tokenizer_config.json")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise ConfigError(f"chat template refused the messages: {message}")

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat template failed to render: {e}") from e
