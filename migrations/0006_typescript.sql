-- TypeScript scripts: a version compiled from TypeScript keeps the original beside the
-- JavaScript that runs (`source`, which ends with an inline source map); its sha256 is the
-- original's. NULL for versions written in JavaScript.
ALTER TABLE script_versions ADD COLUMN typescript text;
