// Records every event of the tenant in its run logs: one line per event, whatever its type.
// TypeScript: compiled once at deploy; the types come from `scriptd types > scriptd.d.ts`
// and the type-only import is gone from what runs.
import type { Event, Handler } from "scriptd";

interface Seen {
  seen: string;
  bytes: number;
}

const describe = (event: Event): string => `${event.type} ${event.id} at ${event.time}`;

const handler: Handler<unknown, Seen> = (event) => {
  console.log(describe(event as Event));
  return { seen: event.type, bytes: JSON.stringify(event.data).length };
};

export default handler;
