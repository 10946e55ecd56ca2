"""The benchmark harness: the measuring, recording and reporting code behind the
``bench_queries``, ``bench_index`` and ``bench_ingest`` commands (and the machine
description and percentiles the retrieval benchmark in ``evaluation.services`` uses).

The commands under ``evaluation/management/commands/`` only read their options,
call these modules and print what they return.
"""
