-- The trace a run belongs to (W3C trace id, 32 hex digits): the run's own span's trace when
-- spans are exported, else the one its event or request came with. The console links runs
-- to traces by it.
ALTER TABLE runs ADD COLUMN trace_id text;
