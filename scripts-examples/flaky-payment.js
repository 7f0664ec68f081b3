// Fails on purpose when the payment is declined, to show retries with backoff and the
// dead-letter subject: `scriptd events publish acme payment.received '{"declined":true}'`.
export default async function (event, ctx) {
  if (event.data.declined) {
    throw new Error(`payment ${event.data.id ?? "?"} declined (attempt ${ctx.attempt})`);
  }
  return { captured: event.data.id };
}
