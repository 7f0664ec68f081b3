// Takes an order over HTTP (POST /hooks/acme/orders) and publishes it as `order.created`
// for the order and invoice scripts; answers 202 with the order's id, or 400.
export default async function (request, ctx) {
  const order = request.body;
  if (request.encoding !== "json" || typeof order?.id !== "string" || !Array.isArray(order.items)) {
    return { status: 400, body: { error: "send a JSON order with an id and items" } };
  }
  await ctx.publish("order.created", order);
  return { status: 202, body: { accepted: order.id } };
}
