"""Many adapters -> one model: ``merge`` (one adapter from many), ``route`` (gates over a bank of
adapters), ``retrieve`` (find the adapters for a query)."""
