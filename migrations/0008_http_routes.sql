-- HTTP-triggered scripts: a script may answer requests to `/hooks/<tenant><path>` with one
-- method. Two scripts of a tenant cannot share a route: `http_key` is the method and the
-- path with its parameters unnamed (`POST /orders/{}`), unique per tenant.
ALTER TABLE scripts
    ADD COLUMN http_method text,
    ADD COLUMN http_path   text,
    ADD COLUMN http_auth   text NOT NULL DEFAULT 'token' CHECK (http_auth IN ('token', 'public')),
    ADD COLUMN http_key    text,
    ADD CHECK ((http_method IS NULL) = (http_path IS NULL) AND (http_path IS NULL) = (http_key IS NULL));

CREATE UNIQUE INDEX scripts_http_route ON scripts (tenant, http_key) WHERE http_key IS NOT NULL;

-- A request's input lives nowhere else (an event's stays in its stream): the run keeps it,
-- as JSON up to 16 KiB like the result.
ALTER TABLE runs ADD COLUMN input jsonb;
