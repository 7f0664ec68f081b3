// Reacts to `order.created`: logs the order and returns the invoice it would request.
export default async function (event, ctx) {
  const order = event.data ?? {};
  ctx.log("order", order.id, "for tenant", ctx.tenant);
  const total = (order.items ?? []).reduce((sum, item) => sum + item.price * item.qty, 0);
  console.info("computed total", total);
  return { invoice: { order: order.id, total, currency: order.currency ?? "EUR" } };
}
