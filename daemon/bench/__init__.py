"""`edgellm bench`: edgellm side by side with llama.cpp's own tools and bare llama-cpp-python.

Modules: options (what a run does), prompts (the texts), doors (how a client reaches each contender),
processes (the processes a run starts), contenders (one round of each figure, native tools' output),
stats, results, runner (the interleaved rounds), report (ratios, targets, table, JSON), plot (PNG),
cli (the command). Only documented interfaces are used: the socket protocol, MQTT topics, config keys.
"""
