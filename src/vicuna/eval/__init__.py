"""Evaluation with an LLM judge: answer question sets, judge answers, report scores.

Pipeline: ``answer`` (questions -> answers through any OpenAI-compatible API) ->
``judge`` (answers -> judgment records, via a judge model) -> ``report`` (judgments ->
scores, win rates, Bradley-Terry ratings, charts). ``parse`` re-reads judge texts.
"""
