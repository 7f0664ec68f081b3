-- What a run was given and what it returned: where its input lives (the event's stream and
-- sequence; the event itself stays in its stream for its max age) and the handler's
-- return value, as JSON up to 16 KiB (larger ones are kept as a note of their size).
ALTER TABLE runs ADD COLUMN input_ref text;
ALTER TABLE runs ADD COLUMN result jsonb;
