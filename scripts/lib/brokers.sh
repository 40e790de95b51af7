# Checks that the message brokers the NATS and RabbitMQ sources are tested against answer; sourced
# by the scripts. This kind of machine starts them before every session and CI run: NATS with
# JetStream on 127.0.0.1:4222 and RabbitMQ on 127.0.0.1:5672 (guest/guest). Tests share them and
# give every stream, queue and exchange a name of its own.
# After `check_brokers`, NATS_URL and AMQP_URL are exported (kept when already set).

# Whether something accepts TCP connections on host $1, port $2.
port_answers() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

check_brokers() {
    NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
    AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
    local nats_host_port="${NATS_URL#*://}" amqp_host_port="${AMQP_URL#*@}"
    nats_host_port="${nats_host_port##*@}"
    amqp_host_port="${amqp_host_port%%/*}"
    local missing=0
    if ! port_answers "${nats_host_port%:*}" "${nats_host_port##*:}"; then
        echo "NATS does not answer at $NATS_URL. Start it with JetStream on:" >&2
        echo "    nats-server --jetstream --addr 127.0.0.1 --port 4222 --store_dir /tmp/nats &" >&2
        missing=1
    fi
    if ! port_answers "${amqp_host_port%:*}" "${amqp_host_port##*:}"; then
        echo "RabbitMQ does not answer at ${AMQP_URL/guest:guest@/}. Start it:" >&2
        echo "    service rabbitmq-server start    (or: rabbitmq-server -detached)" >&2
        missing=1
    fi
    if [ "$missing" = 1 ]; then
        return 1
    fi
    export NATS_URL AMQP_URL
}
