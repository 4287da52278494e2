"""Model lifecycle: evaluate, fine-tune / distill, promote to Serve with rollback.

    data.py     prepare new text with an existing model's tokenizer; default eval data
    eval.py     val loss / perplexity / tokens/s / greedy samples of a model directory
    serve_ops.py find what a running Serve app serves; swap its model (user_config)
    promote.py  eval-gated promotion and rollback, every decision logged (JSONL)
    distill.py  the `raygpt distill` run config (teacher's tokenizer, data and vocab)
    commands.py `raygpt eval | distill | promote | rollback`
"""
