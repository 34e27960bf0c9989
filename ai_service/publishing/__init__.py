"""The publisher's parts: the spool's log format and file layer (:mod:`.segments`) and the
pipelined sender on its own ``SelectConnection`` (:mod:`.pipeline`).  The public API is
:mod:`ai_service.publisher` and :mod:`ai_service.spool`."""
