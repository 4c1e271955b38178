"""``psyche serve``: every run's model answers over the OpenAI API, and follows the run live.

- :mod:`~psyche.serve.textstream`: what of a completion's text may be sent yet (pure).
- :mod:`~psyche.serve.engine`: dynamic batching of completions on a Transformers model.
- :mod:`~psyche.serve.protocol`: the OpenAI request and response shapes, and its errors.
- :mod:`~psyche.serve.app`: the HTTP server (FastAPI).
- :mod:`~psyche.serve.follow`: following a live run's checkpoints (a coordinator server or Solana).
"""
