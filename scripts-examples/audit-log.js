// Records every event of the tenant in its run logs: one line per event, whatever its type.
export default function (event, ctx) {
  console.log(`${event.type} ${event.id} at ${event.time}`);
  return { seen: event.type, bytes: JSON.stringify(event.data).length };
}
