// Reacts to `order.created`: totals the order, counts the tenant's orders per currency in
// its key-value store, and publishes `invoice.requested` for the invoicing script.
export default async function (event, ctx) {
  const order = event.data ?? {};
  const total = (order.items ?? []).reduce((sum, item) => sum + item.price * item.qty, 0);
  const currency = order.currency ?? "EUR";
  const counter = `orders:${currency}`;
  const count = ((await ctx.kv.get(counter)) ?? 0) + 1;
  await ctx.kv.set(counter, count);
  ctx.log("order", order.id, "total", total, currency, "- order", count, "in", currency);
  const { subject } = await ctx.publish("invoice.requested", { order: order.id, total, currency });
  console.info("published", subject);
  return { total, currency, count };
}
