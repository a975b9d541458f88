"""Ask llama.cpp itself whether it accepts a GBNF grammar, and why not.

The one impure piece of constrained output (daemon/constraints.py is pure otherwise); the engine
package can own it later. llama.cpp reports a refused grammar in two places: the parser's reason
("Undefined rule identifier 'foo'", "expecting name at ...") is written with `fprintf(stderr)`, and
the summary ("failed to parse grammar", "grammar does not contain a 'root' symbol", "left recursion
detected") goes through its log callback. So a check briefly points file descriptor 2 at a temp
file (under a lock; anything else written there meanwhile is passed on to the real stderr) and
listens to the log callback for its own thread.

No vocabulary is needed: the grammar is parsed with none, and `<token>` syntax (which needs one) is
refused. What parses here parses with any model's vocabulary.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading

from daemon.engine import llama as engine

_lock = threading.Lock()
_PARSER_REASON = re.compile(r"error parsing grammar: (.*?)\n\n", re.DOTALL)
MAX_REASON_CHARS = 240


def gbnf_refusal(grammar: str, root: str = "root") -> str | None:
    """None if llama.cpp accepts `grammar` with start symbol `root`, else llama.cpp's reason.

    The caller bounds the grammar's size and parenthesis nesting first: llama.cpp's parser is
    recursive and a deeply nested grammar overflows the C stack (a crash, not an error)."""
    import llama_cpp

    engine.route_llama_logs()
    me = threading.get_ident()
    logged: list[str] = []

    def listen(level: int, message: str) -> bool:
        if threading.get_ident() != me:
            return False
        logged.append(message)
        return True  # a client's bad grammar is its error, not the daemon's: not logged as one

    with _lock, tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        engine.llama_log_listeners.append(listen)
        try:
            os.dup2(capture.fileno(), 2)
            try:
                sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode("utf-8"), root.encode("utf-8"))
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
            engine.llama_log_listeners.remove(listen)
        capture.seek(0)
        written = capture.read().decode("utf-8", errors="replace")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    reason, others = _split_parser_output(written, grammar)
    if others:
        os.write(2, others.encode("utf-8"))
    if sampler:
        return None
    detail = reason or "; ".join(m for m in logged if m != "failed to parse grammar") or "failed to parse grammar"
    return _shorten(detail)


def _split_parser_output(written: str, grammar: str) -> tuple[str | None, str]:
    """The parser's reason, and whatever else reached stderr during the check (other threads)."""
    found = _PARSER_REASON.search(written)
    if found is None:
        return None, written
    block_end = found.end()
    # The parser prints the whole grammar after its reason: drop that echo too.
    if written.startswith(grammar + "\n", block_end):
        block_end += len(grammar) + 1
    line_start = written.rfind("\n", 0, found.start()) + 1
    return found.group(1).strip(), written[:line_start] + written[block_end:]


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
