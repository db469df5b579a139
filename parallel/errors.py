# The errors of pipeline communication: a failed transfer, and a rank that waited past its deadline.


class PipelineCommError(RuntimeError):
    """A transfer between pipeline ranks failed; the message names the rank, the action and the peer."""


class PipelineTimeout(PipelineCommError, TimeoutError):
    """A rank waited longer than the runtime's timeout for a peer."""
