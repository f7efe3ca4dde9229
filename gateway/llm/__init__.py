"""The LLM API families the gateway fronts, each behind one interface.

OpenAI chat/completions/embeddings, the Responses API, Anthropic Messages,
rerank/score/images, audio and Ollama's native API differ in where a request
names its model, how many tokens it may cost, which parameters it asks for,
where the answer reports usage and how its stream is framed. The quota,
audit, policy and validate stages must treat them alike, so each family is a
``surfaces.Surface`` that answers those questions, and the stages ask the
surface of the request's path instead of knowing any API.
"""
