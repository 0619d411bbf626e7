DROP TABLE ledger_cosignatures;
