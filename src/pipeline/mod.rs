//! The attempt path, free of NATS: what a job is (`job`), what one attempt runs and how it
//! can end (`attempt`, with the `retry` policy), the `executor` that carries an attempt
//! from its claim to its record, how its end is told (`report`), dead letters
//! (`dead_letter`), batched records and claims (`records` over `batch`), each tenant's
//! share of the engine (`tenants`) the script API of a dry run (`dry_run`) and what
//! both script APIs answer for the services they call (`script_api`). `bus` feeds it messages and settles them.

pub mod attempt;
pub mod batch;
pub mod dead_letter;
pub mod dry_run;
pub mod executor;
pub mod held;
pub mod job;
pub mod records;
pub mod report;
pub mod script_api;
pub mod tenants;
