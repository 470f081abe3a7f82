"""Traffic signal control: backends, safety, controllers and the SUMO benchmark."""
