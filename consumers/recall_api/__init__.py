"""What every recall API shares, the indexer's and the router's: request validation
(``requests``), the HTTP transport (``server``), the refusal type and category caps (``rules``),
the query metrics (``metrics``) and the user-vector table (``users``). docs/api.md."""
