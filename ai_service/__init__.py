"""ai-service: YOLO training, conversion and inference workers driven by RabbitMQ."""
