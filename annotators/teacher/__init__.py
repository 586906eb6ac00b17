"""Teacher, grounder and student MLLMs: one request/reply interface, several backends.

A backend (an OpenAI-compatible endpoint, or a model in this process) answers a batch of
:class:`~groundforge.annotators.teacher.types.TeacherRequest` with one
:class:`~groundforge.annotators.teacher.types.TeacherReply` each, in order; a failure is a reply
with an error kind, never an exception that loses the rest of the batch.
"""
