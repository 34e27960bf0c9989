"""The publisher's parts: the spool's log format and file layer (:mod:`.segments`), the
pipelined sender on its own ``SelectConnection`` (:mod:`.pipeline`), receipts and
backoff (:mod:`.receipts`), refusals for good (:mod:`.refusals`) and their ``*_failed``
replacements (:mod:`.replacements`).  The public API is
:mod:`ai_service.publisher` and :mod:`ai_service.spool`."""
